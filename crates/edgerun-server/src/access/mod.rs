//! # Cloudflare Access verification (optional, off by default)
//!
//! When the node runs behind a Cloudflare Tunnel with an Access application in front of it,
//! Access forwards a signed JWT to the origin in the `Cf-Access-Jwt-Assertion` header.
//! `cloudflared` can check that token itself (`originRequest.access.required`), but that check
//! is easy to misconfigure (a top-level `access` block is silently ignored) and does nothing for
//! a request that reaches the listener some other way. This module is the node's own check:
//! defence in depth, enabled by giving both a team domain and an application AUD tag
//! (`--access-team-domain`, `--access-aud`).
//!
//! ## What is checked
//!
//! * The header is present (`403`, "missing Cf-Access-Jwt-Assertion").
//! * The token is a compact JWS whose header says `alg: RS256` and names a `kid`. Nothing else
//!   is accepted: not `none`, not HS256 (which would let anyone who knows the *public* key sign
//!   tokens), not another RSA or EC variant.
//! * The signature verifies against the team's key with that `kid`, fetched as a JWKS from
//!   `https://<team domain>/cdn-cgi/access/certs` (the `keys` member; `public_cert(s)` are
//!   ignored). Only `kty: RSA` keys of at least 2048 bits, usable for `sig` with `RS256`, are
//!   kept.
//! * `aud` contains the configured AUD tag (Access sends an array; a string is accepted too).
//! * `iss` is exactly `https://<team domain>`.
//! * `exp` is present and not past; `nbf`, when present, is not in the future; `iat`, when
//!   present, is not in the future. All three allow [`AccessConfig::leeway`] of clock skew, and
//!   all three must be JSON numbers: a claim of the wrong type rejects the token (it is never
//!   treated as absent).
//!
//! A rejected request gets `403` with the Workers AI envelope (code 10000), e.g.
//! `Authentication error: invalid Access token: wrong audience`. The reason names the failed
//! check only; it never echoes the token, its claims or any key material.
//!
//! ## Key cache
//!
//! The keys in use are one set, replaced whole by each successful fetch. A background task
//! ([`AccessVerifier::spawn_refresher`], started by `main`) keeps them fresh: it fetches at
//! start-up, then again whenever the set reaches [`AccessConfig::cache_ttl`] (1 hour). A failed
//! refresh is retried with a backoff that starts at [`AccessConfig::min_refetch_interval`]
//! (30 s) and doubles up to 5 minutes; the task holds only a weak reference and ends when the
//! verifier is dropped.
//!
//! The request path never waits on a fetch because the keys are old: a token whose `kid` is in
//! the current set is checked against it at once, however old the set is (up to
//! [`AccessConfig::max_staleness`], below). Only these cases reach the network from a request,
//! and then the request waits for that fetch (at most [`AccessConfig::fetch_timeout`]):
//!
//! * a `kid` not in the set: Access rotates keys every six weeks, and a token signed with the
//!   new key should not wait up to an hour for the refresher;
//! * no keys at all (the fetches so far failed), or keys past the maximum staleness: the node
//!   cannot answer anything but `503` otherwise, and a fetch that succeeds lets it serve at once.
//!
//! All fetches, the refresher's included, share one rate limit, at most one attempt per
//! [`AccessConfig::min_refetch_interval`] whatever the reason, so a stream of made-up `kid`s
//! cannot turn the node into a request amplifier; and they are single-flight: a request that
//! needs a fetch waits for the one in progress rather than starting another. A fetch holds no
//! lock that the known-`kid` path takes, so neither a slow fetch nor a flood of unknown `kid`s
//! delays tokens the current set can check. [`AccessVerifier::key_age`] tells how old the set is.
//! Without the refresher (tests, embedders) keys are fetched only in the cases above, so an old
//! set is replaced only once it passes the maximum staleness.
//!
//! ## Failure modes
//!
//! * A failed fetch (network, timeout after [`AccessConfig::fetch_timeout`], non-2xx, bad JSON,
//!   no usable key) keeps the keys already cached and is logged; tokens keep being checked
//!   against them, with no added wait.
//! * Keys older than [`AccessConfig::max_staleness`] (24 hours by default,
//!   `--access-max-staleness-secs`) are no longer trusted: every token that needs a key gets
//!   `503` (code 3040, retryable, "cannot verify Cloudflare Access tokens: signing keys are N s
//!   old") until a fetch succeeds. Access keeps a rotated-out key valid for seven more days, so a
//!   set a day old still holds only keys Cloudflare accepts and verifies every token signed with
//!   them, while an hourly refresh that has failed for a whole day means the node is cut off
//!   from Cloudflare and could be trusting a key Cloudflare has since retired. It must be at
//!   least the cache lifetime (a smaller value would refuse tokens between two good refreshes).
//! * With no keys at all (the first fetches failed) a token cannot be checked: the request gets
//!   `503` (code 3040, retryable) rather than a `403` that would blame the caller's credentials.
//! * Both `503`s carry `edgerun-not-started: 1`: the request never reached the engine, so the
//!   Worker may send it to another node.
//! * Checks that need no key (header present, well-formed, RS256, has a `kid`) still answer
//!   `403` in those states; an unknown `kid` that a refetch does not resolve is a `403` too
//!   (including when that refetch failed or was rate-limited).
//!
//! ## Where it sits
//!
//! The gate wraps the run routes only, outside the bearer-token check: Access proves the request
//! came through Cloudflare, so it is checked first, and a request from anywhere else is turned
//! away before it can probe the bearer tokens. `/health` and `/metrics` stay ungated so load
//! balancers, orchestrators and scrapers on the private side keep working; they reveal no
//! completions (keep `/metrics` off public hostnames in the tunnel config if its numbers matter).
//!
//! ## Must never
//!
//! * accept any algorithm but RS256 (in particular `none` or an HMAC keyed with public bytes);
//! * accept a key fetched over plain HTTP from anywhere but loopback (key substitution would
//!   bypass the whole check), or follow redirects when fetching keys;
//! * block a tokio worker on network I/O: fetches are async with a timeout (one RSA signature
//!   check is tens of microseconds of CPU and runs inline);
//! * leak the token, claims or key material in responses (logs get the identity at debug).
//!
//! ## Layout
//!
//! `config` holds [`AccessConfig`] and its normalisation and checks; `token` the
//! [`Claims`], the [`Rejection`]s callers see and the node's [`AccessError`]s; this file the
//! key set and JWKS parsing, the [`AccessVerifier`] with its background refresher, and the
//! [`require_access`] middleware.

use crate::error::{respond, ErrorStyle};
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

mod config;
mod token;

pub use config::AccessConfig;
#[cfg(test)]
use config::MAX_STALENESS_SETTING;
use config::{check_max_staleness, is_loopback};
pub use token::{AccessError, Claims, Rejection};

/// The header Access puts its JWT in.
pub const ACCESS_JWT_HEADER: HeaderName = HeaderName::from_static("cf-access-jwt-assertion");

/// Tokens longer than this are rejected before any parsing (Access tokens are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest certs document read (Cloudflare's is a few KiB).
const MAX_CERTS_BYTES: usize = 256 * 1024;
/// Smallest RSA modulus accepted from the JWKS, in bytes (2048 bits).
const MIN_MODULUS_BYTES: usize = 256;
/// The longest the refresher waits between two attempts after failures (unless the refetch
/// interval is longer still).
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);
/// The refresher never sleeps less than this, whatever the configuration (no busy loop with a
/// zero refetch interval or cache lifetime).
const MIN_REFRESH_SLEEP: Duration = Duration::from_millis(100);
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Instant,
}

/// What the current keys say about one `kid`.
enum Lookup {
    Found(Arc<DecodingKey>),
    /// The set is usable but has no key with that `kid`.
    Unknown,
    /// No set was ever fetched.
    NoKeys,
    /// The set is older than the maximum staleness; this old.
    TooStale(Duration),
}

/// What one rate-limited fetch attempt did.
enum Attempt {
    Fetched,
    Failed(AccessError),
    /// The refetch interval since the last attempt has not passed; this much of it is left.
    TooSoon(Duration),
}

/// Checks Access tokens against the team's keys. Cheap to share behind an `Arc`.
pub struct AccessVerifier {
    config: AccessConfig,
    validation: Validation,
    http: reqwest::Client,
    /// The keys in use; replaced whole on each successful fetch. Held only to clone or swap the
    /// `Arc`, never across an `.await`.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held for the duration of a fetch (single flight); holds when the last one started. The
    /// known-`kid` path never takes it.
    fetch_gate: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
    /// Dropped with the verifier, which wakes and ends the refreshers sleeping on it.
    alive: tokio::sync::watch::Sender<()>,
}

impl fmt::Debug for AccessVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessVerifier")
            .field("team_domain", &self.config.team_domain)
            .field("certs_url", &self.config.certs_url)
            .finish_non_exhaustive()
    }
}

impl AccessVerifier {
    /// Refuses a configuration whose [`AccessConfig::max_staleness`] is zero or below its
    /// [`AccessConfig::cache_ttl`] (as [`AccessConfig::with_max_staleness`] does), besides a
    /// missing crypto backend.
    pub fn new(config: AccessConfig) -> Result<Self, AccessError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(AccessError::Config(
                "no JWT crypto provider (jsonwebtoken needs exactly one backend feature)".into(),
            ));
        }
        check_max_staleness(config.max_staleness, config.cache_ttl)?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&[&config.aud]);
        validation.set_issuer(&[config.issuer()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);

        let mut http = reqwest::Client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("edgerun/", env!("CARGO_PKG_VERSION")));
        if reqwest::Url::parse(&config.certs_url).is_ok_and(|u| is_loopback(&u)) {
            http = http.no_proxy();
        }
        let http = http
            .build()
            .map_err(|e| AccessError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            config,
            validation,
            http,
            keys: RwLock::new(None),
            fetch_gate: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            alive: tokio::sync::watch::channel(()).0,
        })
    }

    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    /// How many times the keys have been fetched (attempts, successful or not).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// How long ago the keys in use were fetched; `None` before the first successful fetch.
    /// Past [`AccessConfig::max_staleness`] they are no longer used.
    pub fn key_age(&self) -> Option<Duration> {
        self.current().map(|set| set.fetched_at.elapsed())
    }

    /// Checks `token` and returns its claims. See the module docs for what is checked.
    ///
    /// Never waits on the network for a token whose `kid` the current keys hold; see the
    /// module docs (Key cache) for when it does.
    pub async fn verify(&self, token: &str) -> Result<Claims, AccessError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AccessError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::Malformed.into());
        }
        // The header is read unverified only to pick the key; `decode` below re-checks `alg`.
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(Rejection::UnsupportedAlgorithm.into());
        }
        let kid = header
            .kid
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or(Rejection::MissingKeyId)?;
        let key = self.key_for(kid).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(Rejection::from)?;
        let now = jsonwebtoken::get_current_timestamp();
        if data
            .claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(self.config.leeway.as_secs()))
        {
            return Err(Rejection::IssuedInFuture.into());
        }
        Ok(data.claims)
    }

    /// Fetches the keys now unless a fetch ran within the refetch interval; returns how many
    /// keys are cached afterwards. [`spawn_refresher`](Self::spawn_refresher) does this (and
    /// more) in the background; this is for callers that want to wait for the first fetch.
    pub async fn prefetch(&self) -> Result<usize, AccessError> {
        let mut last = self.fetch_gate.lock().await;
        if let Attempt::Failed(e) = self.fetch_if_allowed(&mut last).await {
            return Err(e);
        }
        drop(last);
        Ok(self.current().map_or(0, |s| s.keys.len()))
    }

    /// Starts the task that keeps the keys fresh (call once, from within a tokio runtime,
    /// right after start-up; it replaces [`prefetch`](Self::prefetch)). It fetches at once,
    /// then whenever the keys reach [`AccessConfig::cache_ttl`]; a failed fetch is retried
    /// after [`AccessConfig::min_refetch_interval`], doubling on each further failure up to 5
    /// minutes, and never sooner than the refetch interval allows. Failures are logged (as
    /// errors once the keys are past [`AccessConfig::max_staleness`]).
    ///
    /// The task holds the verifier only weakly, and only during a fetch; it ends soon after
    /// the last `Arc` is dropped (at once when it is sleeping). Dropping or ignoring the
    /// handle leaves it running; aborting the handle stops it.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let mut alive = self.alive.subscribe();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let Some(verifier) = weak.upgrade() else {
                    return;
                };
                let delay = verifier.refresh_step(&mut failures).await;
                drop(verifier);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    // Only ever an error: the sender is never sent on, only dropped.
                    _ = alive.changed() => return,
                }
            }
        })
    }

    /// One round of the refresher: fetches if the keys are due (or missing) and returns how
    /// long to sleep before the next round.
    async fn refresh_step(&self, failures: &mut u32) -> Duration {
        let ttl = self.config.cache_ttl;
        if let Some(age) = self.key_age() {
            if age < ttl {
                return (ttl - age).max(MIN_REFRESH_SLEEP);
            }
        }
        let attempt = {
            let mut last = self.fetch_gate.lock().await;
            self.fetch_if_allowed(&mut last).await
        };
        match attempt {
            Attempt::Fetched => {
                *failures = 0;
                ttl.max(MIN_REFRESH_SLEEP)
            }
            // Someone else fetched (or tried) lately; look again when the interval allows.
            Attempt::TooSoon(left) => left.max(MIN_REFRESH_SLEEP),
            Attempt::Failed(e) => {
                *failures = failures.saturating_add(1);
                let retry = self.retry_delay(*failures);
                let age = self.key_age();
                let url = &self.config.certs_url;
                match age {
                    Some(age) if age > self.config.max_staleness => tracing::error!(
                        error = %e, %url, key_age_s = age.as_secs(), retry_in_s = retry.as_secs(),
                        "refreshing the Cloudflare Access keys failed and the cached ones are past \
                         the maximum staleness: run requests get 503"
                    ),
                    Some(age) => tracing::warn!(
                        error = %e, %url, key_age_s = age.as_secs(), retry_in_s = retry.as_secs(),
                        "refreshing the Cloudflare Access keys failed; still using the cached ones"
                    ),
                    None => tracing::warn!(
                        error = %e, %url, retry_in_s = retry.as_secs(),
                        "fetching the Cloudflare Access keys failed; run requests get 503 until it works"
                    ),
                }
                retry
            }
        }
    }

    /// The refresher's wait after `failures` failed attempts in a row (at least 1): the
    /// refetch interval, doubled per further failure, capped at 5 minutes (or the interval,
    /// when longer).
    fn retry_delay(&self, failures: u32) -> Duration {
        let base = self.config.min_refetch_interval.max(MIN_REFRESH_SLEEP);
        let doubled = base.saturating_mul(1 << failures.saturating_sub(1).min(20));
        doubled.min(MAX_RETRY_BACKOFF.max(base))
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lookup(&self, kid: &str) -> Lookup {
        let Some(set) = self.current() else {
            return Lookup::NoKeys;
        };
        let age = set.fetched_at.elapsed();
        if age > self.config.max_staleness {
            return Lookup::TooStale(age);
        }
        match set.keys.get(kid) {
            Some(k) => Lookup::Found(k.clone()),
            None => Lookup::Unknown,
        }
    }

    async fn key_for(&self, kid: &str) -> Result<Arc<DecodingKey>, AccessError> {
        // The fast path: current keys, old or not (within the maximum staleness). No lock but
        // the brief read of `keys`, whatever fetch is in progress.
        if let Lookup::Found(k) = self.lookup(kid) {
            return Ok(k);
        }
        // Unknown `kid`, no keys, or keys too stale: a rate-limited, single-flight fetch.
        let mut last = self.fetch_gate.lock().await;
        // The fetch this request waited for may have resolved it.
        if let Lookup::Found(k) = self.lookup(kid) {
            return Ok(k);
        }
        if let Attempt::Failed(e) = self.fetch_if_allowed(&mut last).await {
            tracing::warn!(error = %e, url = %self.config.certs_url, "keeping the cached Access keys");
        }
        drop(last);
        match self.lookup(kid) {
            Lookup::Found(k) => Ok(k),
            Lookup::Unknown => Err(AccessError::Invalid(Rejection::UnknownKey)),
            Lookup::NoKeys => Err(AccessError::KeysUnavailable),
            Lookup::TooStale(age) => Err(AccessError::KeysTooStale { age }),
        }
    }

    /// Fetches and installs the keys if the refetch interval allows. `last` is the gate's
    /// guarded value, so the caller holds the single-flight lock.
    async fn fetch_if_allowed(&self, last: &mut Option<Instant>) -> Attempt {
        if let Some(t) = *last {
            let since = t.elapsed();
            if since < self.config.min_refetch_interval {
                return Attempt::TooSoon(self.config.min_refetch_interval - since);
            }
        }
        *last = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let keys = match self.fetch_keys().await {
            Ok(keys) => keys,
            Err(e) => return Attempt::Failed(e),
        };
        tracing::info!(keys = keys.len(), url = %self.config.certs_url, "fetched Cloudflare Access keys");
        let set = KeySet {
            keys,
            fetched_at: Instant::now(),
        };
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
        Attempt::Fetched
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, Arc<DecodingKey>>, AccessError> {
        let fail = |m: String| AccessError::Fetch(m);
        let mut resp = self
            .http
            .get(&self.config.certs_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > MAX_CERTS_BYTES {
                return Err(fail(format!("response over {MAX_CERTS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}

/// The usable keys of a JWKS document, by `kid`. Entries that are not RS256 signing keys of
/// at least 2048 bits are skipped; a document with none is an error (so old keys are kept).
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<DecodingKey>>, AccessError> {
    #[derive(Deserialize)]
    struct Jwks {
        keys: Vec<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct RsaJwk {
        kid: String,
        kty: String,
        alg: Option<String>,
        #[serde(rename = "use")]
        usage: Option<String>,
        n: String,
        e: String,
    }
    let doc: Jwks = serde_json::from_slice(body)
        .map_err(|e| AccessError::Fetch(format!("not a JWKS document: {e}")))?;
    let mut keys = HashMap::new();
    for value in doc.keys {
        let Ok(jwk) = serde_json::from_value::<RsaJwk>(value) else {
            continue;
        };
        if jwk.kid.is_empty()
            || jwk.kty != "RSA"
            || jwk.alg.as_deref().is_some_and(|a| a != "RS256")
            || jwk.usage.as_deref().is_some_and(|u| u != "sig")
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_rsa_components(&jwk.n, &jwk.e) else {
            continue;
        };
        let DecodingKeyKind::RsaModulusExponent { n, .. } = key.kind() else {
            continue;
        };
        let significant = n.iter().skip_while(|b| **b == 0).count();
        if significant < MIN_MODULUS_BYTES {
            continue;
        }
        keys.insert(jwk.kid, Arc::new(key));
    }
    if keys.is_empty() {
        return Err(AccessError::Fetch("no usable RS256 key in the JWKS".into()));
    }
    Ok(keys)
}

/// Rejects requests without a valid `Cf-Access-Jwt-Assertion` when Access is configured; a
/// no-op otherwise. Accepted requests carry the token's [`Claims`] in their extensions.
pub async fn require_access(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(verifier) = state.access.clone() else {
        return next.run(req).await;
    };
    let style = ErrorStyle::of_path(req.uri().path());
    let result = match req.headers().get(&ACCESS_JWT_HEADER) {
        None => Err(AccessError::Missing),
        Some(v) => match v.to_str() {
            Ok(token) => verifier.verify(token).await,
            Err(_) => Err(Rejection::Malformed.into()),
        },
    };
    match result {
        Ok(claims) => {
            tracing::debug!(identity = claims.identity(), "Access token accepted");
            req.extensions_mut().insert(claims);
            next.run(req).await
        }
        Err(e) if e.is_unavailable() => {
            tracing::debug!(reason = %e, "request refused: Access tokens cannot be checked");
            // Turned away before anything started: the Worker may retry on another node.
            respond(e.api_error(), style, true)
        }
        Err(e) => {
            tracing::debug!(reason = %e, "request refused by the Access check");
            respond(e.api_error(), style, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_domain_forms() {
        for raw in [
            "myteam.cloudflareaccess.com",
            "https://myteam.cloudflareaccess.com",
            " HTTPS://MyTeam.cloudflareaccess.com/ ",
            "myteam",
        ] {
            let c = AccessConfig::new(raw, "aud").unwrap();
            assert_eq!(c.team_domain, "myteam.cloudflareaccess.com", "{raw}");
            assert_eq!(c.issuer(), "https://myteam.cloudflareaccess.com");
            assert_eq!(
                c.certs_url,
                "https://myteam.cloudflareaccess.com/cdn-cgi/access/certs"
            );
        }
        for raw in [
            "",
            "http://myteam.cloudflareaccess.com",
            "myteam.cloudflareaccess.com/x",
            "user@myteam.cloudflareaccess.com",
            "myteam.cloudflareaccess.com:8443",
            "my team",
        ] {
            assert!(AccessConfig::new(raw, "aud").is_err(), "{raw:?}");
        }
        assert!(AccessConfig::new("myteam", " ").is_err());
    }

    #[test]
    fn certs_url_must_be_https_unless_loopback() {
        let c = AccessConfig::new("t.example.com", "aud").unwrap();
        assert!(c
            .clone()
            .with_certs_url("https://keys.example.com/certs")
            .is_ok());
        assert!(c.clone().with_certs_url("http://127.0.0.1:9/certs").is_ok());
        assert!(c.clone().with_certs_url("http://localhost/certs").is_ok());
        assert!(c
            .clone()
            .with_certs_url("http://keys.example.com/certs")
            .is_err());
        assert!(c.clone().with_certs_url("ftp://127.0.0.1/certs").is_err());
        assert!(c.with_certs_url("not a url").is_err());
    }

    #[test]
    fn max_staleness_defaults_to_a_day_and_is_checked() {
        let c = AccessConfig::new("t.example.com", "aud").unwrap();
        assert_eq!(c.max_staleness, Duration::from_secs(24 * 3600));
        assert!(check_max_staleness(Duration::ZERO, Duration::ZERO).is_err());
        assert!(check_max_staleness(Duration::from_secs(59), Duration::from_secs(60)).is_err());
        assert!(check_max_staleness(Duration::from_secs(60), Duration::from_secs(60)).is_ok());
        // A config with the fields set by hand is checked when the verifier is built.
        let mut bad = c.clone();
        bad.cache_ttl = Duration::from_secs(25 * 3600);
        assert!(matches!(
            AccessVerifier::new(bad),
            Err(AccessError::Config(m)) if m.contains(MAX_STALENESS_SETTING)
        ));
    }

    #[test]
    fn refresher_backoff_doubles_from_the_refetch_interval_up_to_five_minutes() {
        let c = AccessConfig::new("t.example.com", "aud").unwrap();
        let v = AccessVerifier::new(c.clone()).unwrap();
        let secs: Vec<u64> = (1..=8).map(|n| v.retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 300, 300, 300, 300]);
        assert_eq!(v.retry_delay(u32::MAX), MAX_RETRY_BACKOFF);
        // A refetch interval over the cap is still respected.
        let mut slow = c.clone();
        slow.min_refetch_interval = Duration::from_secs(600);
        let v = AccessVerifier::new(slow).unwrap();
        assert_eq!(v.retry_delay(1), Duration::from_secs(600));
        assert_eq!(v.retry_delay(5), Duration::from_secs(600));
        // No busy loop with a zero interval.
        let mut zero = c;
        zero.min_refetch_interval = Duration::ZERO;
        let v = AccessVerifier::new(zero).unwrap();
        assert_eq!(v.retry_delay(1), MIN_REFRESH_SLEEP);
    }

    #[test]
    fn unavailable_errors_are_503_3040() {
        let stale = AccessError::KeysTooStale {
            age: Duration::from_secs(90_061),
        };
        assert!(stale.is_unavailable());
        let e = stale.api_error();
        assert_eq!((e.status, e.code), (503, 3040));
        assert_eq!(
            e.message,
            "cannot verify Cloudflare Access tokens: signing keys are 90061 s old"
        );
        assert!(AccessError::KeysUnavailable.is_unavailable());
        assert!(!AccessError::Missing.is_unavailable());
        assert!(!AccessError::Invalid(Rejection::UnknownKey).is_unavailable());
    }

    #[test]
    fn jwks_keeps_only_rs256_signing_keys() {
        let n = "AQAB".repeat(100); // 300 bytes of modulus
        let short = "AQAB".repeat(10);
        let body = serde_json::json!({
            "keys": [
                {"kid": "good", "kty": "RSA", "alg": "RS256", "use": "sig", "e": "AQAB", "n": n},
                {"kid": "noalg", "kty": "RSA", "e": "AQAB", "n": n},
                {"kid": "ps", "kty": "RSA", "alg": "PS256", "e": "AQAB", "n": n},
                {"kid": "enc", "kty": "RSA", "use": "enc", "e": "AQAB", "n": n},
                {"kid": "small", "kty": "RSA", "e": "AQAB", "n": short},
                {"kid": "ec", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
                "junk"
            ],
            "public_cert": {"kid": "good", "cert": "-----BEGIN CERTIFICATE-----"},
            "public_certs": []
        });
        let keys = parse_jwks(body.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["good", "noalg"]);
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }
}
