//! What the node checks Access tokens against ([`AccessConfig`]): the team domain normalised
//! to a bare host, the AUD tag, where the keys come from (HTTPS, or plain HTTP to a loopback
//! host for tests), and the cache, refetch and staleness settings with their checks.

use std::net::IpAddr;
use std::time::Duration;

use super::AccessError;

/// The setting [`AccessConfig::max_staleness`] comes from, for error messages.
pub(super) const MAX_STALENESS_SETTING: &str =
    "--access-max-staleness-secs (EDGERUN_ACCESS_MAX_STALENESS_SECS)";

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
    /// How old the keys get before the background refresher fetches them again. Requests
    /// never wait on this refresh; they keep using the current keys until
    /// [`max_staleness`](Self::max_staleness).
    pub cache_ttl: Duration,
    /// The least time between two fetches of the keys (successful or not, for any reason), and
    /// the refresher's first retry delay after a failure.
    pub min_refetch_interval: Duration,
    /// Limit on one fetch of the keys, connection included.
    pub fetch_timeout: Duration,
    /// Keys older than this are not trusted: tokens get `503` until a fetch succeeds. At least
    /// [`cache_ttl`](Self::cache_ttl); set with [`AccessConfig::with_max_staleness`]. See the
    /// module docs for the 24-hour default.
    pub max_staleness: Duration,
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
            max_staleness: Duration::from_secs(24 * 3600),
        })
    }

    /// Trust keys up to `max` old (default 24 hours). Refused when zero or shorter than
    /// [`cache_ttl`](Self::cache_ttl) (1 hour): the keys are only refreshed that often.
    pub fn with_max_staleness(mut self, max: Duration) -> Result<Self, AccessError> {
        check_max_staleness(max, self.cache_ttl)?;
        self.max_staleness = max;
        Ok(self)
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

pub(super) fn check_max_staleness(max: Duration, cache_ttl: Duration) -> Result<(), AccessError> {
    if max.is_zero() {
        return Err(AccessError::Config(format!(
            "{MAX_STALENESS_SETTING} must be at least 1"
        )));
    }
    if max < cache_ttl {
        return Err(AccessError::Config(format!(
            "{MAX_STALENESS_SETTING} must be at least the Access key cache lifetime ({} s): \
             the keys are only refreshed that often",
            cache_ttl.as_secs_f64()
        )));
    }
    Ok(())
}

pub(super) fn normalize_team_domain(raw: &str) -> Result<String, AccessError> {
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

pub(super) fn is_loopback(url: &reqwest::Url) -> bool {
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
