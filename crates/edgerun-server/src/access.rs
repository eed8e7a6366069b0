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
//! Keys are fetched lazily (and once at start-up, in the background, by `main`) and cached for
//! [`AccessConfig::cache_ttl`] (1 hour). Access rotates keys every six weeks and keeps the old
//! one valid for seven more days, so a token naming an unknown `kid` triggers a refetch, but at
//! most one fetch per [`AccessConfig::min_refetch_interval`] (30 s) whatever the reason, so a
//! stream of made-up `kid`s cannot turn the node into a request amplifier. Fetches are
//! single-flight: concurrent requests wait for the one fetch in progress.
//!
//! ## Failure modes
//!
//! * A failed fetch (network, timeout after [`AccessConfig::fetch_timeout`], non-2xx, bad JSON,
//!   no usable key) keeps the keys already cached, stale or not, and is logged; the next attempt
//!   waits for the refetch interval.
//! * With no keys at all (the first fetches failed) a token cannot be checked: the request gets
//!   `503` (code 3040, retryable) rather than a `403` that would blame the caller's credentials.
//! * An unknown `kid` that a refetch does not resolve is a `403`.
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

use crate::error::IntoHttp;
use crate::AppState;
use axum::extract::{Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use edgerun_protocol::ApiError;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use thiserror::Error;

/// The header Access puts its JWT in.
pub const ACCESS_JWT_HEADER: HeaderName = HeaderName::from_static("cf-access-jwt-assertion");

/// Tokens longer than this are rejected before any parsing (Access tokens are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest certs document read (Cloudflare's is a few KiB).
const MAX_CERTS_BYTES: usize = 256 * 1024;
/// Smallest RSA modulus accepted from the JWKS, in bytes (2048 bits).
const MIN_MODULUS_BYTES: usize = 256;

/// How the node checks Access tokens. Build with [`AccessConfig::new`].
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// The team domain, normalised to a bare lower-case host (`myteam.cloudflareaccess.com`).
    pub team_domain: String,
    /// The Access application's AUD tag; tokens must list it in `aud`.
    pub aud: String,
    /// Where the signing keys come from; `https://<team domain>/cdn-cgi/access/certs` unless
    /// overridden with [`AccessConfig::with_certs_url`].
    pub certs_url: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// How long fetched keys are used before being refreshed.
    pub cache_ttl: Duration,
    /// The least time between two fetches of the keys (successful or not).
    pub min_refetch_interval: Duration,
    /// Limit on one fetch of the keys, connection included.
    pub fetch_timeout: Duration,
}

impl AccessConfig {
    /// `team_domain` may be given as `myteam.cloudflareaccess.com`, with an `https://` prefix
    /// or a trailing `/`, or as the bare team name `myteam` (as in cloudflared's `teamName`).
    pub fn new(team_domain: &str, aud: &str) -> Result<Self, AccessError> {
        let team_domain = normalize_team_domain(team_domain)?;
        let aud = aud.trim();
        if aud.is_empty() || aud.chars().any(char::is_whitespace) {
            return Err(AccessError::Config(
                "the Access AUD tag must be a non-empty word".into(),
            ));
        }
        Ok(Self {
            certs_url: format!("https://{team_domain}/cdn-cgi/access/certs"),
            team_domain,
            aud: aud.to_string(),
            leeway: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(3600),
            min_refetch_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
        })
    }

    /// Fetch keys from `url` instead (tests, private mirrors). It must be `https`, or `http` to
    /// a loopback address. The issuer checked stays `https://<team domain>`.
    pub fn with_certs_url(mut self, url: &str) -> Result<Self, AccessError> {
        let parsed = reqwest::Url::parse(url.trim())
            .map_err(|e| AccessError::Config(format!("the Access certs URL is invalid: {e}")))?;
        match parsed.scheme() {
            "https" => {}
            "http" if is_loopback(&parsed) => {}
            _ => {
                return Err(AccessError::Config(
                    "the Access certs URL must be https (plain http only to a loopback address)"
                        .into(),
                ))
            }
        }
        self.certs_url = parsed.to_string();
        Ok(self)
    }

    /// The `iss` every token must carry.
    pub fn issuer(&self) -> String {
        format!("https://{}", self.team_domain)
    }
}

fn normalize_team_domain(raw: &str) -> Result<String, AccessError> {
    let bad = |why: &str| {
        AccessError::Config(format!(
            "the Access team domain {raw:?} {why}; expected e.g. myteam.cloudflareaccess.com"
        ))
    };
    let mut d = raw.trim();
    if d.len() >= 8 && d[..8].eq_ignore_ascii_case("https://") {
        d = &d[8..];
    } else if d.contains("://") {
        return Err(bad("must be a host name (https only)"));
    }
    let d = d.trim_end_matches('/');
    if d.is_empty() || d.contains(['/', '@', ':', '?', '#']) || d.contains(char::is_whitespace) {
        return Err(bad("must be a bare host name"));
    }
    let host = if d.contains('.') {
        d.to_string()
    } else {
        format!("{d}.cloudflareaccess.com")
    };
    let url = reqwest::Url::parse(&format!("https://{host}/")).map_err(|_| bad("is invalid"))?;
    match url.host_str() {
        Some(h) if h.eq_ignore_ascii_case(&host) => Ok(h.to_ascii_lowercase()),
        _ => Err(bad("is invalid")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a token was turned away. Its `Display` is what the client sees after
/// "invalid Access token: ".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Not a compact JWS, bad base64/JSON, or a claim of the wrong type.
    Malformed,
    /// The header's `alg` is not RS256.
    UnsupportedAlgorithm,
    /// The header names no `kid`.
    MissingKeyId,
    /// No key with the token's `kid`, even after a refetch.
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    WrongIssuer,
    MissingClaim(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("malformed token"),
            Self::UnsupportedAlgorithm => f.write_str("unsupported algorithm (RS256 required)"),
            Self::MissingKeyId => f.write_str("no key id"),
            Self::UnknownKey => f.write_str("unknown signing key"),
            Self::BadSignature => f.write_str("bad signature"),
            Self::Expired => f.write_str("token expired"),
            Self::NotYetValid => f.write_str("token not yet valid"),
            Self::IssuedInFuture => f.write_str("token issued in the future"),
            Self::WrongAudience => f.write_str("wrong audience"),
            Self::WrongIssuer => f.write_str("wrong issuer"),
            Self::MissingClaim(c) => write!(f, "missing claim {c}"),
        }
    }
}

impl From<jsonwebtoken::errors::Error> for Rejection {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                Self::UnsupportedAlgorithm
            }
            ErrorKind::MissingRequiredClaim(c) => Self::MissingClaim(c.clone()),
            // A key the library cannot use fails the signature, not the caller's token format.
            ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => Self::BadSignature,
            _ => Self::Malformed,
        }
    }
}

/// Everything this module can fail with.
#[derive(Debug, Error)]
pub enum AccessError {
    /// Bad configuration, reported at start-up.
    #[error("{0}")]
    Config(String),
    /// The request carries no `Cf-Access-Jwt-Assertion`.
    #[error("missing Cf-Access-Jwt-Assertion")]
    Missing,
    /// The token failed a check.
    #[error("invalid Access token: {0}")]
    Invalid(Rejection),
    /// No signing keys could be fetched yet, so no token can be checked.
    #[error("Access signing keys are unavailable")]
    KeysUnavailable,
    /// One fetch of the keys failed (kept internal: logged, never sent to clients).
    #[error("fetching Access keys failed: {0}")]
    Fetch(String),
}

impl From<Rejection> for AccessError {
    fn from(r: Rejection) -> Self {
        Self::Invalid(r)
    }
}

impl AccessError {
    /// The wire form: 403 / 10000 for the caller's token, 503 when the node cannot check.
    pub fn api_error(&self) -> ApiError {
        match self {
            Self::Missing | Self::Invalid(_) => ApiError::forbidden(self),
            Self::KeysUnavailable | Self::Fetch(_) => {
                ApiError::unavailable("cannot verify Cloudflare Access tokens yet, try again")
            }
            Self::Config(_) => ApiError::internal("Access verification is misconfigured"),
        }
    }
}

/// The claims of an accepted token that the node cares about. Inserted into the request's
/// extensions for handlers further in.
///
/// `aud`, `iss` and `exp` default when absent only so that the validation reports which claim
/// is missing (they are required there); a claim of the wrong type fails deserialization.
#[derive(Clone, Debug, Deserialize)]
pub struct Claims {
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub exp: u64,
    pub iat: Option<u64>,
    pub nbf: Option<u64>,
    pub sub: Option<String>,
    /// Set for users who logged in through an identity provider.
    pub email: Option<String>,
    /// Set for service tokens (the token's client id).
    pub common_name: Option<String>,
    /// `app` for application tokens.
    #[serde(rename = "type")]
    pub token_type: Option<String>,
}

impl Claims {
    /// Who the token speaks for: the user's email, the service token's client id, or `sub`.
    pub fn identity(&self) -> &str {
        [&self.email, &self.common_name, &self.sub]
            .into_iter()
            .flatten()
            .find(|s| !s.is_empty())
            .map_or("", String::as_str)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Instant,
}

/// Checks Access tokens against the team's keys. Cheap to share behind an `Arc`.
pub struct AccessVerifier {
    config: AccessConfig,
    validation: Validation,
    http: reqwest::Client,
    /// The keys in use; replaced whole on each successful fetch.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held for the duration of a fetch (single flight); holds when the last one started.
    fetch_gate: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
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
    pub fn new(config: AccessConfig) -> Result<Self, AccessError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(AccessError::Config(
                "no JWT crypto provider (jsonwebtoken needs exactly one backend feature)".into(),
            ));
        }
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
        })
    }

    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    /// How many times the keys have been fetched (attempts, successful or not).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Checks `token` and returns its claims. See the module docs for what is checked.
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
    /// keys are cached afterwards. `main` calls this once at start-up.
    pub async fn prefetch(&self) -> Result<usize, AccessError> {
        let mut last = self.fetch_gate.lock().await;
        self.fetch_if_allowed(&mut last).await?;
        Ok(self.current().map_or(0, |s| s.keys.len()))
    }

    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_stale(&self, set: &KeySet) -> bool {
        set.fetched_at.elapsed() >= self.config.cache_ttl
    }

    async fn key_for(&self, kid: &str) -> Result<Arc<DecodingKey>, AccessError> {
        if let Some(set) = self.current() {
            if !self.is_stale(&set) {
                if let Some(k) = set.keys.get(kid) {
                    return Ok(k.clone());
                }
            }
        }
        let mut last = self.fetch_gate.lock().await;
        // Another request may have refreshed the keys while this one waited.
        if let Some(set) = self.current() {
            if let (false, Some(k)) = (self.is_stale(&set), set.keys.get(kid)) {
                return Ok(k.clone());
            }
        }
        if let Err(e) = self.fetch_if_allowed(&mut last).await {
            tracing::warn!(error = %e, url = %self.config.certs_url, "keeping the cached Access keys");
        }
        drop(last);
        match self.current() {
            Some(set) => set
                .keys
                .get(kid)
                .cloned()
                .ok_or(AccessError::Invalid(Rejection::UnknownKey)),
            None => Err(AccessError::KeysUnavailable),
        }
    }

    /// Fetches and installs the keys if the refetch interval allows. `last` is the gate's
    /// guarded value, so the caller holds the single-flight lock.
    async fn fetch_if_allowed(&self, last: &mut Option<Instant>) -> Result<(), AccessError> {
        if last.is_some_and(|t| t.elapsed() < self.config.min_refetch_interval) {
            return Ok(());
        }
        *last = Some(Instant::now());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let keys = self.fetch_keys().await?;
        tracing::info!(keys = keys.len(), url = %self.config.certs_url, "fetched Cloudflare Access keys");
        let set = KeySet {
            keys,
            fetched_at: Instant::now(),
        };
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
        Ok(())
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
        Err(e) => {
            tracing::debug!(reason = %e, "request refused by the Access check");
            e.api_error().into_http()
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
