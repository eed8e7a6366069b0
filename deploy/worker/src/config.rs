//! The Worker's configuration: the `NODES` variable (regions, their origins and who they serve),
//! the caller tokens, and the body limit. Parsed and checked once per request from the
//! environment; a bad configuration is reported to the caller as a 500 naming the variable, never
//! as a panic.

use crate::WorkerError;
use serde::Deserialize;

/// The body limit the nodes enforce by default (`edgerun serve --max-body-bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// Most nodes one region may list.
pub const MAX_ORIGINS: usize = 64;

/// Secret holding the nodes' bearer token when a region names none of its own.
pub const DEFAULT_NODE_TOKEN_SECRET: &str = "NODE_TOKEN";

/// The `NODES` variable.
///
/// ```json
/// {
///   "default": "us",
///   "regions": [
///     {"name": "eu", "origin": "https://eu.node.example.com", "continents": ["EU", "AF"]},
///     {"name": "us", "origin": "https://us.node.example.com", "continents": ["NA", "SA"],
///      "colos": ["NRT"], "token_secret": "NODE_TOKEN_US"}
///   ]
/// }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    /// Regions in failover order.
    pub regions: Vec<Region>,
    /// The region for callers no region claims; the first region when absent.
    #[serde(default)]
    pub default: Option<String>,
    /// Model names every region's nodes serve (unless a region lists its own). When this or any
    /// region's `models` is set, the Worker answers names no region serves itself, with the
    /// node's `5007` error; when none is, every name is passed on and the node decides.
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

/// One region: its nodes, each behind its own Tunnel hostname (`origin` for one node, `origins`
/// for several; exactly one of the two).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Short name, returned to callers in `x-edgerun-region`.
    pub name: String,
    /// `https://host[:port]` of the region's one node (no path). [`NodesConfig::parse`] moves it
    /// into `origins`.
    #[serde(default)]
    pub origin: Option<String>,
    /// `https://host[:port]` of each of the region's nodes, at most [`MAX_ORIGINS`]. Which one
    /// serves a request is the `balance` module's choice.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Continent codes of `request.cf.continent` (`EU`, `NA`, `AS`, ...) this region serves.
    #[serde(default)]
    pub continents: Vec<String>,
    /// Country codes of `request.cf.country` this region serves (checked before continents).
    #[serde(default)]
    pub countries: Vec<String>,
    /// Cloudflare colos (`request.cf.colo`, e.g. `FRA`) this region serves (checked first).
    #[serde(default)]
    pub colos: Vec<String>,
    /// Name of the secret holding this node's bearer token; [`DEFAULT_NODE_TOKEN_SECRET`] when
    /// absent.
    #[serde(default)]
    pub token_secret: Option<String>,
    /// The models this region's nodes serve (a chat model and embedding models, say), when they
    /// differ from the top-level `models`: a request for a model goes only to regions that
    /// serve it.
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

impl Region {
    /// The secret that holds this region's node token.
    pub fn token_secret(&self) -> &str {
        self.token_secret
            .as_deref()
            .unwrap_or(DEFAULT_NODE_TOKEN_SECRET)
    }
}

/// Where the caller is, from `request.cf`. Every field is optional: `wrangler dev` and a local
/// `workerd` have no `cf` object at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub colo: Option<String>,
    pub country: Option<String>,
    pub continent: Option<String>,
}

impl NodesConfig {
    /// Parses and checks `NODES`.
    pub fn parse(json: &str) -> Result<Self, WorkerError> {
        let mut config: NodesConfig = serde_json::from_str(json)
            .map_err(|e| WorkerError::Config(format!("NODES is not valid: {e}")))?;
        if config.regions.is_empty() {
            return Err(WorkerError::Config("NODES lists no region".into()));
        }
        for (i, region) in config.regions.iter().enumerate() {
            if region.name.is_empty() {
                return Err(WorkerError::Config(format!("NODES region {i} has no name")));
            }
            if config.regions[..i].iter().any(|r| r.name == region.name) {
                return Err(WorkerError::Config(format!(
                    "NODES names region {:?} twice",
                    region.name
                )));
            }
        }
        for region in &mut config.regions {
            let named =
                |why: String| WorkerError::Config(format!("NODES region {:?}: {why}", region.name));
            match (region.origin.take(), region.origins.is_empty()) {
                (Some(origin), true) => region.origins.push(origin),
                (None, false) => {}
                (Some(_), false) => {
                    return Err(named("give `origin` or `origins`, not both".into()))
                }
                (None, true) => return Err(named("has no `origin` (or `origins`)".into())),
            }
            if region.origins.len() > MAX_ORIGINS {
                return Err(named(format!(
                    "lists {} origins, more than {MAX_ORIGINS}",
                    region.origins.len()
                )));
            }
            for (i, origin) in region.origins.iter().enumerate() {
                check_origin(origin).map_err(|why| named(format!("origin {origin:?} {why}")))?;
                let same = |o: &String| o.trim_end_matches('/') == origin.trim_end_matches('/');
                if region.origins[..i].iter().any(same) {
                    return Err(named(format!("lists origin {origin:?} twice")));
                }
            }
        }
        if let Some(default) = &config.default {
            if !config.regions.iter().any(|r| &r.name == default) {
                return Err(WorkerError::Config(format!(
                    "NODES default {default:?} is not one of its regions"
                )));
            }
        }
        Ok(config)
    }

    /// Regions in the order to try them for a caller at `location`: the region that claims the
    /// caller's colo, else country, else continent, else the default; then every other region in
    /// the order `NODES` lists them.
    pub fn regions_for(&self, location: &Location) -> Vec<&Region> {
        let claims = |pick: fn(&Region) -> &Vec<String>, value: &Option<String>| {
            let value = value.as_deref()?;
            self.regions
                .iter()
                .position(|r| pick(r).iter().any(|v| v.eq_ignore_ascii_case(value)))
        };
        let first = claims(|r| &r.colos, &location.colo)
            .or_else(|| claims(|r| &r.countries, &location.country))
            .or_else(|| claims(|r| &r.continents, &location.continent))
            .or_else(|| {
                let default = self.default.as_deref()?;
                self.regions.iter().position(|r| r.name == default)
            })
            .unwrap_or(0);
        let mut order = Vec::with_capacity(self.regions.len());
        order.push(&self.regions[first]);
        order.extend(
            self.regions
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, r)| r),
        );
        order
    }

    /// Whether `model` may be passed to a node: some region serves it ([`Self::region_serves`]).
    pub fn serves(&self, model: &str) -> bool {
        self.regions.iter().any(|r| self.region_serves(r, model))
    }

    /// Whether `region` serves `model`: its own `models` say, else the top-level `models`, else
    /// every name is passed on (the node decides).
    pub fn region_serves(&self, region: &Region, model: &str) -> bool {
        region
            .models
            .as_ref()
            .or(self.models.as_ref())
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    /// [`Self::regions_for`], keeping only the regions that serve `model` when the request
    /// names one.
    pub fn regions_for_model(&self, location: &Location, model: Option<&str>) -> Vec<&Region> {
        let mut regions = self.regions_for(location);
        if let Some(model) = model {
            regions.retain(|r| self.region_serves(r, model));
        }
        regions
    }
}

/// `https://host[:port]`; `http://` only to a loopback host (local tests and `wrangler dev`):
/// the Access secret and the node token must never cross a network in the clear.
///
/// Nothing but `host[:port]` may follow the scheme: no path, query, fragment, userinfo (`@`:
/// `http://127.0.0.1@evil.example` is a request to `evil.example`), backslash (URL parsers read
/// it as `/`), whitespace or control characters; a port is 1 to 5 digits below 65536.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let (rest, plain) = match origin.strip_prefix("https://") {
        Some(rest) => (rest, false),
        None => (
            origin
                .strip_prefix("http://")
                .ok_or("must start with https://")?,
            true,
        ),
    };
    let host_port = rest.strip_suffix('/').unwrap_or(rest);
    if host_port.is_empty() {
        return Err("has no host");
    }
    if host_port.contains(['/', '?', '#', '@', '\\'])
        || host_port
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("must be scheme://host[:port] only");
    }
    let (host, port) = split_host_port(host_port).ok_or("must be scheme://host[:port] only")?;
    if host.is_empty() {
        return Err("has no host");
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !valid {
            return Err("has an invalid port");
        }
    }
    if plain && !is_loopback_host(host) {
        return Err("must use https:// (http:// only to loopback)");
    }
    Ok(())
}

/// `host[:port]` split into the host (a bracketed IPv6 literal keeps its brackets) and the port
/// text; `None` for an unbracketed host with more than one `:` or text after `]` that is not
/// `:port`.
fn split_host_port(host_port: &str) -> Option<(&str, Option<&str>)> {
    if host_port.starts_with('[') {
        let end = host_port.find(']')?;
        let (host, after) = host_port.split_at(end + 1);
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match host_port.split_once(':') {
        None => Some((host_port, None)),
        Some((_, port)) if port.contains(':') => None,
        Some((host, port)) => Some((host, Some(port))),
    }
}

/// Whether `host` (from [`split_host_port`]) is certainly this machine, decided on the parsed
/// address, never on a text prefix (`127.attacker.example` is a DNS name anyone can point
/// anywhere): `localhost` (any case), a dotted-quad IPv4 literal in 127.0.0.0/8, or the
/// bracketed IPv6 literal `[::1]` (in any spelling). Everything else is refused, including
/// forms a URL parser would also read as loopback but which take a second parser to agree with
/// (`127.1`, `0177.0.0.1`, `2130706433`) and the IPv4-mapped `[::ffff:127.0.0.1]`: write
/// `127.0.0.1`.
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback()),
    }
}

/// Parses `MAX_BODY_BYTES` (a plain byte count); [`DEFAULT_MAX_BODY_BYTES`] when unset.
pub fn parse_body_limit(value: Option<&str>) -> Result<usize, WorkerError> {
    match value.map(str::trim) {
        None | Some("") => Ok(DEFAULT_MAX_BODY_BYTES),
        Some(v) => v
            .parse()
            .map_err(|_| WorkerError::Config(format!("MAX_BODY_BYTES {v:?} is not a byte count"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = r#"{
        "default": "us",
        "regions": [
            {"name": "eu", "origin": "https://eu.example.com", "continents": ["EU", "AF"],
             "countries": ["TR"]},
            {"name": "us", "origin": "https://us.example.com/", "continents": ["NA", "SA"]},
            {"name": "ap", "origin": "http://127.0.0.1:9000", "continents": ["AS", "OC"],
             "colos": ["LAX"], "token_secret": "NODE_TOKEN_AP"}
        ]
    }"#;

    fn at(colo: Option<&str>, country: Option<&str>, continent: Option<&str>) -> Location {
        Location {
            colo: colo.map(String::from),
            country: country.map(String::from),
            continent: continent.map(String::from),
        }
    }

    fn names(order: Vec<&Region>) -> Vec<&str> {
        order.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn callers_go_to_their_region_then_the_others_in_order() {
        let c = NodesConfig::parse(NODES).unwrap();
        let order = |l| names(c.regions_for(&l));
        assert_eq!(order(at(None, None, Some("EU"))), ["eu", "us", "ap"]);
        assert_eq!(order(at(None, None, Some("af"))), ["eu", "us", "ap"]);
        assert_eq!(order(at(None, None, Some("NA"))), ["us", "eu", "ap"]);
        assert_eq!(order(at(None, None, Some("OC"))), ["ap", "eu", "us"]);
        // colo beats country beats continent
        assert_eq!(order(at(Some("LAX"), None, Some("NA"))), ["ap", "eu", "us"]);
        assert_eq!(order(at(None, Some("TR"), Some("AS"))), ["eu", "us", "ap"]);
        // unknown or missing location: the default
        assert_eq!(
            order(at(Some("XXX"), Some("ZZ"), Some("AN"))),
            ["us", "eu", "ap"]
        );
        assert_eq!(order(Location::default()), ["us", "eu", "ap"]);
    }

    #[test]
    fn without_a_default_the_first_region_is_it() {
        let c = NodesConfig::parse(
            r#"{"regions":[{"name":"a","origin":"https://a"},{"name":"b","origin":"https://b"}]}"#,
        )
        .unwrap();
        assert_eq!(names(c.regions_for(&Location::default())), ["a", "b"]);
    }

    #[test]
    fn a_region_lists_one_origin_or_several() {
        let c = NodesConfig::parse(
            r#"{"regions":[{"name":"a","origin":"https://a"},
                           {"name":"b","origins":["https://b1","https://b2:8443"]}]}"#,
        )
        .unwrap();
        assert_eq!(c.regions[0].origins, ["https://a"]);
        assert_eq!(c.regions[0].origin, None);
        assert_eq!(c.regions[1].origins, ["https://b1", "https://b2:8443"]);
        let many: Vec<String> = (0..=MAX_ORIGINS).map(|i| format!("https://n{i}")).collect();
        let json = serde_json::json!({"regions": [{"name": "a", "origins": many}]}).to_string();
        let err = NodesConfig::parse(&json).unwrap_err().to_string();
        assert!(err.contains("more than 64"), "{err}");
    }

    #[test]
    fn token_secrets_default_to_node_token() {
        let c = NodesConfig::parse(NODES).unwrap();
        assert_eq!(c.regions[0].token_secret(), "NODE_TOKEN");
        assert_eq!(c.regions[2].token_secret(), "NODE_TOKEN_AP");
    }

    #[test]
    fn bad_configurations_are_named() {
        for (json, says) in [
            ("", "NODES is not valid"),
            ("[]", "NODES is not valid"),
            (r#"{"regions":[]}"#, "no region"),
            (r#"{"regions":[{"name":"a"}]}"#, "has no `origin`"),
            (
                r#"{"regions":[{"name":"a","origins":[]}]}"#,
                "has no `origin`",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"https://a","origins":["https://b"]}]}"#,
                "not both",
            ),
            (
                r#"{"regions":[{"name":"a","origins":["https://b","https://b/"]}]}"#,
                "lists origin \"https://b/\" twice",
            ),
            (
                r#"{"regions":[{"name":"a","origins":["https://b","http://c.example"]}]}"#,
                "origin \"http://c.example\" must use https://",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"https://a","region":"x"}]}"#,
                "unknown field",
            ),
            (
                r#"{"regions":[{"name":"","origin":"https://a"}]}"#,
                "has no name",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"https://a"},{"name":"a","origin":"https://b"}]}"#,
                "twice",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"ftp://a"}]}"#,
                "must start with",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"https://"}]}"#,
                "has no host",
            ),
            (
                r#"{"regions":[{"name":"a","origin":"https://a/run"}]}"#,
                "host[:port] only",
            ),
            (
                r#"{"default":"b","regions":[{"name":"a","origin":"https://a"}]}"#,
                "not one of its regions",
            ),
        ] {
            let err = NodesConfig::parse(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    fn origin_error(origin: &str) -> Option<String> {
        let json = serde_json::json!({"regions": [{"name": "a", "origin": origin}]}).to_string();
        NodesConfig::parse(&json).err().map(|e| e.to_string())
    }

    #[test]
    fn plain_http_is_for_loopback_only() {
        for origin in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1",
            "http://127.0.0.1/",
            "http://127.255.3.4:9",
            "http://localhost",
            "http://LocalHost:81",
            "http://[::1]:81",
            "http://[::1]",
            "http://[0:0:0:0:0:0:0:1]:81",
            "https://eu.example.com:8443",
            "https://127.0.0.1.evil.example",
            "https://[2001:db8::1]:443",
        ] {
            assert_eq!(origin_error(origin), None, "{origin}");
        }
    }

    #[test]
    fn loopback_is_decided_on_the_parsed_address() {
        // Each of these would receive the node token and the Access secret in clear text.
        for origin in [
            "http://127.attacker.example",
            "http://127.evil",
            "http://127.0.0.1.evil.example",
            "http://127.0.0.1.nip.io:8080",
            "http://localhost.evil.example",
            "http://localhost.",
            "http://evil-localhost",
            "http://10.0.0.1:8080",
            "http://[::2]:81",
            "http://[2001:db8::1]",
            // Loopback to a WHATWG URL parser too, but refused: one spelling, one parser.
            "http://127.1",
            "http://0177.0.0.1",
            "http://2130706433",
            "http://0x7f.0.0.1",
            // IPv4-mapped IPv6 (`::ffff:127.0.0.1`) is not `Ipv6Addr::is_loopback`: refused.
            "http://[::ffff:127.0.0.1]",
            "http://[::ffff:7f00:1]:81",
        ] {
            let err = origin_error(origin).unwrap_or_else(|| panic!("{origin} was accepted"));
            assert!(err.contains("must use https://"), "{origin}: {err}");
        }
        // Not host[:port]: refused whatever the scheme.
        for origin in [
            "http://127.0.0.1@evil.example",
            "http://evil.example@127.0.0.1",
            "https://user:pw@eu.example.com",
            "http://127.0.0.1\\@evil.example",
            "http://evil.example#@127.0.0.1",
            "http://evil.example?127.0.0.1",
            "http://127.0.0.1:80/path",
            "http://127.0.0.1 .evil.example",
            "http://127.0.0.1\t.evil.example",
            "http://[::1]x",
            "http://[::1:81",
            "http://::1:81",
            "http://127.0.0.1:8080:1",
        ] {
            let err = origin_error(origin).unwrap_or_else(|| panic!("{origin} was accepted"));
            assert!(err.contains("host[:port] only"), "{origin}: {err}");
        }
        for origin in [
            "http://127.0.0.1:",
            "http://127.0.0.1:0",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:8o",
            "http://127.0.0.1:+80",
            "https://eu.example.com:000443",
            "http://[::1]:",
        ] {
            let err = origin_error(origin).unwrap_or_else(|| panic!("{origin} was accepted"));
            assert!(err.contains("invalid port"), "{origin}: {err}");
        }
        for origin in ["http://:80", "https://:443", "http://"] {
            let err = origin_error(origin).unwrap_or_else(|| panic!("{origin} was accepted"));
            assert!(err.contains("has no host"), "{origin}: {err}");
        }
    }

    #[test]
    fn model_list_is_optional() {
        let c = NodesConfig::parse(NODES).unwrap();
        assert!(c.serves("anything"));
        let c = NodesConfig::parse(
            r#"{"models":["@cf/meta/llama-3-8b-instruct"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        assert!(c.serves("@cf/meta/llama-3-8b-instruct"));
        assert!(!c.serves("@cf/meta/llama-2"));
    }

    /// The example shipped in wrangler.toml is a valid configuration (as wrangler passes a
    /// `[vars.NODES]` table: JSON).
    #[test]
    fn the_wrangler_toml_example_parses() {
        let text = include_str!("../wrangler.toml");
        let doc: toml::Table = toml::from_str(text).unwrap();
        let vars = doc["vars"].as_table().unwrap();
        let nodes = serde_json::to_string(&vars["NODES"]).unwrap();
        let config = NodesConfig::parse(&nodes).unwrap();
        assert_eq!(config.regions.len(), 3);
        let limit = parse_body_limit(vars["MAX_BODY_BYTES"].as_str()).unwrap();
        assert_eq!(limit, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(
            names(config.regions_for(&at(None, None, Some("EU")))),
            ["eu", "us", "ap"]
        );
    }

    #[test]
    fn body_limit_defaults_to_the_nodes() {
        assert_eq!(parse_body_limit(None).unwrap(), 1 << 20);
        assert_eq!(parse_body_limit(Some(" 2048 ")).unwrap(), 2048);
        assert!(parse_body_limit(Some("1MB")).is_err());
    }
}
