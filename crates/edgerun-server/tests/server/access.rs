//! The Cloudflare Access gate, without a model: tokens are signed with RSA keys made here and
//! the keys are served as a JWKS by a small local server. A request that passes both gates
//! reaches the (never loaded) engine and gets 503 / 3040 "the model is loading".

use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use edgerun_server::access::{AccessConfig, AccessError, AccessVerifier, ACCESS_JWT_HEADER};
use edgerun_server::{router, AppState, TokenSet};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::{Generate, PrivateKey};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tower::ServiceExt;

const MODEL: &str = "@cf/meta/llama-3-8b-instruct";
const TEAM: &str = "test-team.cloudflareaccess.com";
const ISS: &str = "https://test-team.cloudflareaccess.com";
const AUD: &str = "4714c1358e65fe4b408ad6d432a5f878f08194bdb4752441fd56faefa9b2b6f2";
const BEARER: &str = "secret";

struct TestKey {
    kid: &'static str,
    signing: EncodingKey,
    /// The public key as a JWKS entry.
    jwk: Value,
    /// The public key's DER bytes, for the HS256 confusion attack.
    public_der: Vec<u8>,
}

/// Three key pairs, made once per test binary: A (served), B (served after rotation) and an
/// attacker's key that is never served.
fn keys() -> &'static [TestKey; 3] {
    static KEYS: OnceLock<[TestKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let make = |kid: &'static str| {
            let private = PrivateKey::generate();
            let der = private.to_pkcs1_der().unwrap();
            let signing = EncodingKey::from_rsa_der(der.as_bytes());
            let mut jwk =
                serde_json::to_value(Jwk::from_encoding_key(&signing, Algorithm::RS256).unwrap())
                    .unwrap();
            jwk["kid"] = json!(kid);
            jwk["use"] = json!("sig");
            jwk["alg"] = json!("RS256");
            let public_der = private
                .to_public_key()
                .to_pkcs1_der()
                .unwrap()
                .as_bytes()
                .to_vec();
            TestKey {
                kid,
                signing,
                jwk,
                public_der,
            }
        };
        std::thread::scope(|s| {
            let a = s.spawn(|| make("key-a"));
            let b = s.spawn(|| make("key-b"));
            let evil = s.spawn(|| make("key-evil"));
            [a.join().unwrap(), b.join().unwrap(), evil.join().unwrap()]
        })
    })
}

fn key_a() -> &'static TestKey {
    &keys()[0]
}
fn key_b() -> &'static TestKey {
    &keys()[1]
}
fn key_evil() -> &'static TestKey {
    &keys()[2]
}

/// A stand-in for `https://<team>/cdn-cgi/access/certs`: serves the given keys (or 500 when
/// `None`) in Cloudflare's document shape, or hangs (see [`Certs::hang`]), and counts hits.
struct Certs {
    keys: Mutex<Option<Vec<Value>>>,
    hanging: AtomicBool,
    hits: AtomicUsize,
    url: String,
}

impl Certs {
    async fn start(keys: Option<Vec<&TestKey>>) -> Arc<Certs> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/cdn-cgi/access/certs",
            listener.local_addr().unwrap()
        );
        let certs = Arc::new(Certs {
            keys: Mutex::new(None),
            hanging: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            url,
        });
        certs.serve(keys);
        let app = Router::new()
            .route("/cdn-cgi/access/certs", get(certs_handler))
            .with_state(certs.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        certs
    }

    /// Serves `keys` (500 when `None`) from the next request on, and stops hanging.
    fn serve(&self, keys: Option<Vec<&TestKey>>) {
        *self.keys.lock().unwrap() = keys.map(|ks| ks.iter().map(|k| k.jwk.clone()).collect());
        self.hanging.store(false, Ordering::SeqCst);
    }

    /// Requests from now on get no answer for a minute (far past any fetch timeout here).
    fn hang(&self) {
        self.hanging.store(true, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn certs_handler(State(certs): State<Arc<Certs>>) -> Response {
    certs.hits.fetch_add(1, Ordering::SeqCst);
    if certs.hanging.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    match certs.keys.lock().unwrap().clone() {
        Some(keys) => Json(json!({
            "keys": keys,
            "public_cert": {"kid": "key-a", "cert": "-----BEGIN CERTIFICATE-----\n..."},
            "public_certs": [{"kid": "key-a", "cert": "-----BEGIN CERTIFICATE-----\n..."}],
        }))
        .into_response(),
        None => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
    }
}

fn config(certs: &Certs) -> AccessConfig {
    AccessConfig::new(TEAM, AUD)
        .unwrap()
        .with_certs_url(&certs.url)
        .unwrap()
}

fn app_with(access: Option<Arc<AccessVerifier>>) -> Router {
    let mut state = AppState::new(vec![MODEL.to_string()], TokenSet::new([BEARER.to_string()]));
    state.access = access;
    router(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims as Access sends them, with `overrides` merged in (`null` removes a claim).
fn claims(overrides: Value) -> Value {
    let now = now();
    let mut c = json!({
        "aud": [AUD],
        "email": "ops@example.com",
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "iss": ISS,
        "type": "app",
        "identity_nonce": "6ei69kawdKzMIAPF",
        "sub": "7335d417-61da-459d-899c-0a01c76a2f94",
        "country": "US"
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(key: &TestKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_string());
    encode(&header, claims, &key.signing).unwrap()
}

fn valid_token() -> String {
    sign(key_a(), key_a().kid, &claims(json!({})))
}

fn b64(v: &Value) -> String {
    // base64url without padding, by hand: the tests need no base64 crate for this.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = serde_json::to_vec(v).unwrap();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn run_request(access_token: Option<&str>, bearer: Option<&str>) -> Request<Body> {
    let mut b = Request::post(format!("/run/{MODEL}"));
    if let Some(t) = access_token {
        b = b.header(ACCESS_JWT_HEADER, t);
    }
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Body::from(r#"{"prompt":"hi"}"#)).unwrap()
}

/// Polls `cond` every 10 ms until it holds; panics after `limit`.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Verifies `token` directly and asserts it took no fetch-sized wait.
async fn verify_quickly(verifier: &AccessVerifier, token: &str) -> Result<(), AccessError> {
    let start = Instant::now();
    let result = verifier.verify(token).await;
    let took = start.elapsed();
    // Behavioural, not a benchmark: the fetches in these tests hang for 2 s.
    assert!(took < Duration::from_millis(200), "verify took {took:?}");
    result.map(|_| ())
}

async fn send(app: Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// `(code, message)` of an error envelope.
fn error_of(body: &str) -> (u64, String) {
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["success"], false, "{body}");
    (
        v["errors"][0]["code"].as_u64().unwrap(),
        v["errors"][0]["message"].as_str().unwrap().to_string(),
    )
}

/// Sends a run request and asserts the gates let it through to the engine.
async fn assert_passes(app: &Router, token: &str) {
    let (status, body) = send(app.clone(), run_request(Some(token), Some(BEARER))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        error_of(&body),
        (3040, "the model is loading, try again shortly".to_string()),
        "{body}"
    );
}

/// Sends a run request and asserts the Access gate refuses it with `reason`.
async fn assert_refused(app: &Router, token: Option<&str>, reason: &str) {
    let (status, body) = send(app.clone(), run_request(token, Some(BEARER))).await;
    assert_eq!(status, 403, "{reason}: {body}");
    let (code, message) = error_of(&body);
    assert_eq!(code, 10000, "{body}");
    assert_eq!(message, format!("Authentication error: {reason}"), "{body}");
}

#[tokio::test]
async fn valid_token_passes_both_gates() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let verifier = Arc::new(AccessVerifier::new(config(&certs)).unwrap());
    let app = app_with(Some(verifier.clone()));
    assert_passes(&app, &valid_token()).await;

    // `aud` as a single string, a service token (common_name, no email), no nbf/iat.
    let service = claims(json!({
        "aud": AUD, "email": null, "common_name": "88bf3b6d86161464f6509f7219099e57.access",
        "nbf": null, "iat": null, "sub": ""
    }));
    let token = sign(key_a(), key_a().kid, &service);
    assert_passes(&app, &token).await;
    let accepted = verifier.verify(&token).await.unwrap();
    assert_eq!(
        accepted.identity(),
        "88bf3b6d86161464f6509f7219099e57.access"
    );
    // An audience list that includes ours, among others.
    let token = sign(
        key_a(),
        key_a().kid,
        &claims(json!({"aud": ["other-app", AUD]})),
    );
    assert_passes(&app, &token).await;
    assert_eq!(certs.hits(), 1, "keys are cached");

    // The bearer check still applies behind Access...
    let (status, body) = send(app.clone(), run_request(Some(&valid_token()), None)).await;
    assert_eq!(status, 401, "{body}");
    // ...and Access is checked first: a right bearer token without Access gets 403.
    assert_refused(&app, None, "missing Cf-Access-Jwt-Assertion").await;
}

#[tokio::test]
async fn tokens_failing_a_check_are_403() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let app = app_with(Some(Arc::new(AccessVerifier::new(config(&certs)).unwrap())));
    let a = key_a();
    let now = now();
    let signed = |c: Value| sign(a, a.kid, &claims(c));

    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(a.kid.to_string());
        encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(&a.public_der).unwrap(),
        )
        .unwrap()
    };
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": a.kid})),
        b64(&claims(json!({})))
    );
    let valid = valid_token();
    let (head_payload, _) = valid.rsplit_once('.').unwrap();
    let other_sig = sign(key_evil(), a.kid, &claims(json!({})));
    let spliced = format!("{head_payload}.{}", other_sig.rsplit_once('.').unwrap().1);

    let cases: Vec<(String, &str)> = vec![
        (signed(json!({"aud": ["other-app"]})), "wrong audience"),
        (signed(json!({"aud": "other-app"})), "wrong audience"),
        (signed(json!({"aud": null})), "missing claim aud"),
        (
            signed(json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})),
            "token expired",
        ),
        (signed(json!({"exp": null})), "missing claim exp"),
        (
            signed(json!({"exp": (now + 600).to_string()})),
            "malformed token",
        ),
        (
            signed(json!({"nbf": (now + 3600).to_string()})),
            "malformed token",
        ),
        (signed(json!({"nbf": now + 3600})), "token not yet valid"),
        (
            signed(json!({"iat": now + 3600})),
            "token issued in the future",
        ),
        (
            signed(json!({"iss": "https://other-team.cloudflareaccess.com"})),
            "wrong issuer",
        ),
        (signed(json!({"iss": TEAM})), "wrong issuer"),
        (signed(json!({"iss": null})), "missing claim iss"),
        (sign(key_evil(), a.kid, &claims(json!({}))), "bad signature"),
        (spliced, "bad signature"),
        (hs256, "unsupported algorithm (RS256 required)"),
        (unsigned, "malformed token"),
        (
            {
                let mut h = Header::new(Algorithm::RS256);
                h.kid = None;
                encode(&h, &claims(json!({})), &a.signing).unwrap()
            },
            "no key id",
        ),
        ("not-a-jwt".to_string(), "malformed token"),
        (format!("{valid}x"), "malformed token"),
        ("a".repeat(20_000), "malformed token"),
    ];
    for (token, reason) in &cases {
        assert_refused(
            &app,
            Some(token),
            &format!("invalid Access token: {reason}"),
        )
        .await;
    }
    assert_refused(&app, None, "missing Cf-Access-Jwt-Assertion").await;
    assert_refused(&app, Some(""), "missing Cf-Access-Jwt-Assertion").await;
    // Nothing above needed a second fetch.
    assert_eq!(certs.hits(), 1);
}

#[tokio::test]
async fn unknown_kid_refetches_once_and_accepts_rotated_key() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let mut cfg = config(&certs);
    cfg.min_refetch_interval = Duration::ZERO;
    let verifier = Arc::new(AccessVerifier::new(cfg).unwrap());
    let app = app_with(Some(verifier.clone()));
    assert_passes(&app, &valid_token()).await;
    assert_eq!(certs.hits(), 1);

    // Key B is not published yet: one refetch, then 403.
    let token_b = sign(key_b(), key_b().kid, &claims(json!({})));
    assert_refused(
        &app,
        Some(&token_b),
        "invalid Access token: unknown signing key",
    )
    .await;
    assert_eq!(certs.hits(), 2);

    // Cloudflare rotates: B is published next to A. The next B token refetches and passes.
    certs.serve(Some(vec![key_a(), key_b()]));
    assert_passes(&app, &token_b).await;
    assert_eq!(certs.hits(), 3);
    // Both keys now come from the cache.
    assert_passes(&app, &token_b).await;
    assert_passes(&app, &valid_token()).await;
    assert_eq!(certs.hits(), 3);
    assert_eq!(verifier.fetch_count(), 3);
}

#[tokio::test]
async fn refetches_are_rate_limited() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    // The default interval (30 s).
    let app = app_with(Some(Arc::new(AccessVerifier::new(config(&certs)).unwrap())));
    assert_passes(&app, &valid_token()).await;
    certs.serve(Some(vec![key_a(), key_b()]));
    for kid in ["made-up-1", "made-up-2", "made-up-3", "key-b"] {
        let token = sign(key_b(), kid, &claims(json!({})));
        assert_refused(
            &app,
            Some(&token),
            "invalid Access token: unknown signing key",
        )
        .await;
    }
    assert_eq!(certs.hits(), 1, "no refetch within the interval");
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_fetch() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let verifier = Arc::new(AccessVerifier::new(config(&certs)).unwrap());
    let token = valid_token();
    let results = futures::future::join_all((0..16).map(|_| verifier.verify(&token))).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(certs.hits(), 1);
}

#[tokio::test]
async fn old_keys_are_used_without_a_request_triggered_fetch() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let mut cfg = config(&certs);
    cfg.min_refetch_interval = Duration::ZERO;
    cfg.cache_ttl = Duration::ZERO; // the keys are always due for a refresh
    let app = app_with(Some(Arc::new(AccessVerifier::new(cfg).unwrap())));
    assert_passes(&app, &valid_token()).await;
    certs.serve(None);
    assert_passes(&app, &valid_token()).await;
    certs.hang();
    assert_passes(&app, &valid_token()).await;
    assert_eq!(
        certs.hits(),
        1,
        "refreshing is the refresher's job: a known kid never waits on a fetch"
    );
}

#[tokio::test]
async fn unknown_kid_fetch_does_not_hold_up_known_keys() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let mut cfg = config(&certs);
    cfg.min_refetch_interval = Duration::ZERO;
    cfg.fetch_timeout = Duration::from_secs(2);
    let verifier = Arc::new(AccessVerifier::new(cfg).unwrap());
    assert_eq!(verifier.prefetch().await.unwrap(), 1);
    certs.hang();
    // A token with a kid not in the set starts a refetch, which hangs...
    let token_b = sign(key_b(), key_b().kid, &claims(json!({})));
    let unknown = tokio::spawn({
        let verifier = verifier.clone();
        async move { verifier.verify(&token_b).await }
    });
    eventually("the refetch to start", Duration::from_secs(2), || {
        certs.hits() == 2
    })
    .await;
    // ...while tokens the current set can check go through at once.
    for _ in 0..5 {
        verify_quickly(&verifier, &valid_token()).await.unwrap();
    }
    assert!(!unknown.is_finished());
    let result = unknown.await.unwrap();
    assert!(matches!(result, Err(AccessError::Invalid(_))), "{result:?}");
}

#[tokio::test]
async fn refresher_serves_stale_keys_while_refresh_fails_then_picks_up_new_ones() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let mut cfg = config(&certs);
    cfg.cache_ttl = Duration::from_millis(300);
    cfg.min_refetch_interval = Duration::from_millis(100);
    cfg.fetch_timeout = Duration::from_secs(2);
    let verifier = Arc::new(AccessVerifier::new(cfg).unwrap());
    let refresher = verifier.spawn_refresher();
    // It fetches at start-up, with no request involved.
    eventually("the first fetch", Duration::from_secs(5), || {
        verifier.key_age().is_some()
    })
    .await;
    assert_eq!(certs.hits(), 1);
    verify_quickly(&verifier, &valid_token()).await.unwrap();

    // Cloudflare stops answering; the keys pass their TTL and the refresher's fetch hangs.
    let before = certs.hits();
    certs.hang();
    eventually("a refresh to hang", Duration::from_secs(5), || {
        certs.hits() > before
    })
    .await;
    assert!(verifier.key_age().unwrap() >= Duration::from_millis(300));
    // Known kids are checked against the stale keys at once, all through the hanging fetch.
    for _ in 0..8 {
        verify_quickly(&verifier, &valid_token()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(verifier.key_age().unwrap() >= Duration::from_millis(1000));

    // Cloudflare is back, now with key B next to A. The refresher's fetch times out, it
    // retries, and installs the new set.
    let recovered = Instant::now();
    certs.serve(Some(vec![key_a(), key_b()]));
    eventually("the refresher to recover", Duration::from_secs(10), || {
        verifier.key_age().unwrap() < recovered.elapsed()
    })
    .await;
    // Key B came from the background: with the endpoint failing again, a B token verifies
    // (were B unknown, its refetch would fail and the token be refused).
    certs.serve(None);
    let token_b = sign(key_b(), key_b().kid, &claims(json!({})));
    verify_quickly(&verifier, &token_b).await.unwrap();
    verify_quickly(&verifier, &valid_token()).await.unwrap();

    // The task holds the verifier weakly and ends with it.
    drop(verifier);
    tokio::time::timeout(Duration::from_secs(5), refresher)
        .await
        .expect("the refresher ends when the verifier is dropped")
        .unwrap();
}

#[tokio::test]
async fn keys_past_max_staleness_get_503_until_a_refresh_succeeds() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let mut cfg = config(&certs);
    cfg.cache_ttl = Duration::from_millis(200);
    cfg.min_refetch_interval = Duration::from_millis(100);
    cfg.fetch_timeout = Duration::from_secs(2);
    let cfg = cfg.with_max_staleness(Duration::from_millis(700)).unwrap();
    let verifier = Arc::new(AccessVerifier::new(cfg).unwrap());
    let app = app_with(Some(verifier.clone()));
    let _refresher = verifier.spawn_refresher();
    eventually("the first fetch", Duration::from_secs(5), || {
        verifier.key_age().is_some()
    })
    .await;
    assert_passes(&app, &valid_token()).await;

    // Every fetch fails from now on; within the maximum staleness the old keys still serve.
    certs.serve(None);
    eventually("the keys to pass their TTL", Duration::from_secs(5), || {
        verifier.key_age().unwrap() > Duration::from_millis(300)
    })
    .await;
    if verifier.key_age().unwrap() < Duration::from_millis(600) {
        verify_quickly(&verifier, &valid_token()).await.unwrap();
    }
    eventually(
        "the keys to pass the maximum staleness",
        Duration::from_secs(5),
        || verifier.key_age().unwrap() > Duration::from_millis(750),
    )
    .await;
    assert!(verifier.fetch_count() >= 2, "the refresher kept trying");

    // Past it, no token is trusted: 503, never 403, for a known kid and an unknown one.
    let result = verify_quickly(&verifier, &valid_token()).await;
    assert!(
        matches!(result, Err(AccessError::KeysTooStale { age }) if age > Duration::from_millis(700)),
        "{result:?}"
    );
    let token_b = sign(key_b(), key_b().kid, &claims(json!({})));
    for token in [valid_token(), token_b.clone()] {
        let resp = app
            .clone()
            .oneshot(run_request(Some(&token), Some(BEARER)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["edgerun-not-started"], "1");
        let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let (code, message) = error_of(std::str::from_utf8(&body).unwrap());
        assert_eq!(code, 3040);
        assert!(
            message.starts_with("cannot verify Cloudflare Access tokens: signing keys are ")
                && message.ends_with(" s old"),
            "{message}"
        );
    }
    // A token that needs no key to refuse is still the caller's fault.
    assert_refused(
        &app,
        Some("not-a-jwt"),
        "invalid Access token: malformed token",
    )
    .await;

    // Cloudflare is back: the refresher fetches (no request needed) and tokens verify again.
    let recovered = Instant::now();
    certs.serve(Some(vec![key_a(), key_b()]));
    eventually("the refresher to recover", Duration::from_secs(10), || {
        verifier.key_age().unwrap() < recovered.elapsed()
    })
    .await;
    assert_passes(&app, &valid_token()).await;
    assert_passes(&app, &token_b).await;
}

#[test]
fn max_staleness_must_cover_the_cache_lifetime() {
    let base = AccessConfig::new(TEAM, AUD).unwrap();
    assert_eq!(base.max_staleness, Duration::from_secs(24 * 3600));
    for bad in [Duration::ZERO, Duration::from_secs(3599)] {
        match base.clone().with_max_staleness(bad) {
            Err(AccessError::Config(m)) => assert!(
                m.contains("--access-max-staleness-secs (EDGERUN_ACCESS_MAX_STALENESS_SECS)"),
                "{m}"
            ),
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    for good in [
        Duration::from_secs(3600),
        Duration::from_secs(7 * 24 * 3600),
    ] {
        assert_eq!(
            base.clone().with_max_staleness(good).unwrap().max_staleness,
            good
        );
    }
    // The check follows the cache lifetime in force.
    let mut short = base;
    short.cache_ttl = Duration::from_secs(60);
    assert!(short
        .clone()
        .with_max_staleness(Duration::from_secs(60))
        .is_ok());
    assert!(short.with_max_staleness(Duration::from_secs(59)).is_err());
}

#[tokio::test]
async fn without_any_keys_requests_get_503_not_403() {
    let certs = Certs::start(None).await;
    let app = app_with(Some(Arc::new(AccessVerifier::new(config(&certs)).unwrap())));
    let resp = app
        .clone()
        .oneshot(run_request(Some(&valid_token()), Some(BEARER)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["edgerun-not-started"], "1");
    let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    assert_eq!(
        error_of(std::str::from_utf8(&body).unwrap()),
        (
            3040,
            "cannot verify Cloudflare Access tokens yet, try again".to_string()
        )
    );
    // The request tried a fetch (the keys may have come back); the next one within the
    // refetch interval does not.
    assert_eq!(certs.hits(), 1);
    let (status, _) = send(app.clone(), run_request(Some(&valid_token()), Some(BEARER))).await;
    assert_eq!(status, 503);
    assert_eq!(certs.hits(), 1);
    // Without a token it is still a plain 403: no fetch needed to refuse that.
    assert_refused(&app, None, "missing Cf-Access-Jwt-Assertion").await;
}

#[tokio::test]
async fn health_and_metrics_need_no_access_token() {
    let certs = Certs::start(Some(vec![key_a()])).await;
    let app = app_with(Some(Arc::new(AccessVerifier::new(config(&certs)).unwrap())));
    let (status, body) = send(
        app.clone(),
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(body, r#"{"status":"loading"}"#);
    let (status, _) = send(app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_ne!(status, 403);
    assert_eq!(certs.hits(), 0);
}

#[tokio::test]
async fn without_access_configured_nothing_changes() {
    let app = app_with(None);
    let (status, body) = send(app.clone(), run_request(None, Some(BEARER))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body).0, 3040);
    // A stray (even bogus) Access header is ignored.
    let (status, _) = send(app.clone(), run_request(Some("junk"), Some(BEARER))).await;
    assert_eq!(status, 503);
    let (status, _) = send(app, run_request(None, None)).await;
    assert_eq!(status, 401);
}

#[test]
fn cli_needs_team_domain_and_aud_together() {
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_edgerun"));
        for (k, _) in std::env::vars() {
            if k.starts_with("EDGERUN_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args(["serve", "--model", "/nonexistent/model.gguf"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for args in [
        &["--access-team-domain", TEAM][..],
        &["--access-aud", AUD][..],
        &["--access-certs-url", "https://keys.example.com/certs"][..],
    ] {
        let err = run(args);
        assert!(
            err.contains("needs both --access-team-domain and --access-aud"),
            "{args:?}: {err}"
        );
    }
    let err = run(&[
        "--access-team-domain",
        "http://x.example.com",
        "--access-aud",
        AUD,
    ]);
    assert!(err.contains("team domain"), "{err}");
    // Both given: configuration passes, and the run fails later, on the missing model.
    let err = run(&["--access-team-domain", TEAM, "--access-aud", AUD]);
    assert!(err.contains("Cloudflare Access verification on"), "{err}");
    assert!(err.contains("model.gguf"), "{err}");
}
