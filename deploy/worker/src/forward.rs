//! What the Worker sends to a node and what it adds to the answer: the upstream URL, the request
//! headers (the caller's, minus credentials, cookies and hop-by-hop headers, plus the Access
//! service token, the node's bearer token and the request id) and the request id itself.

use crate::config::Region;
use crate::WorkerError;

/// Workers AI's request-id header: kept when the caller sent a usable one, passed to the node,
/// returned to the caller.
pub use edgerun_protocol::REQUEST_ID_HEADER;
/// Which region answered (returned to the caller; operators grep for it).
pub const REGION_HEADER: &str = "x-edgerun-region";
/// Which node of the region answered ([`crate::balance::Node::label`]: the region's name, with
/// `/index` when it has several).
pub const NODE_HEADER: &str = "x-edgerun-node";
/// The Cloudflare Access service-token headers the Tunnel's Access application checks.
pub const ACCESS_CLIENT_ID_HEADER: &str = "cf-access-client-id";
pub const ACCESS_CLIENT_SECRET_HEADER: &str = "cf-access-client-secret";

/// Headers never passed from the caller to a node: the hop-by-hop headers (RFC 9110 §7.6.1,
/// plus the non-standard `Proxy-Connection` and `Keep-Alive`), the body length and host (the
/// runtime sets them), the caller's credentials and cookies (the Worker sends the node's own
/// credentials; a caller's cookies are for the Worker's hostname, never for a node's), and
/// client-address headers a caller could forge (the Worker sets `x-forwarded-for` from
/// `cf-connecting-ip`). Headers the caller's `Connection` header names are dropped too.
const DROPPED: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "cookie",
    "cookie2",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// The header names listed in every `Connection` header of `headers` (lowercased): hop-by-hop
/// headers of that one connection, which a proxy must not forward (RFC 9110 §7.6.1).
fn connection_options(headers: &[(String, String)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|option| option.trim().to_ascii_lowercase())
        .filter(|option| !option.is_empty())
        .collect()
}

/// Credentials the Worker holds for one region.
#[derive(Clone, Default)]
pub struct NodeCredentials {
    /// `ACCESS_CLIENT_ID` / `ACCESS_CLIENT_SECRET`: the Access service token.
    pub access_client_id: Option<String>,
    pub access_client_secret: Option<String>,
    /// The node's `--api-token`, from the region's token secret.
    pub node_token: Option<String>,
}

/// Secret holding the Access service token's client id.
pub const ACCESS_CLIENT_ID_SECRET: &str = "ACCESS_CLIENT_ID";
/// Secret holding the Access service token's client secret.
pub const ACCESS_CLIENT_SECRET_SECRET: &str = "ACCESS_CLIENT_SECRET";

impl NodeCredentials {
    /// The credentials for `region`, read with `secret` (name → value). Every one is required: a
    /// missing secret would otherwise surface as the node's 401 or Access's 403, which reads like
    /// the caller's fault; instead it is a 500 naming the secret.
    pub fn for_region(
        region: &Region,
        secret: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, WorkerError> {
        let required = |name: &str| {
            secret(name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| WorkerError::Config(format!("the secret {name} is not set")))
        };
        Ok(Self {
            access_client_id: Some(required(ACCESS_CLIENT_ID_SECRET)?),
            access_client_secret: Some(required(ACCESS_CLIENT_SECRET_SECRET)?),
            node_token: Some(required(region.token_secret())?),
        })
    }
}

/// Whether a node's response header goes on to the caller. Cookies are dropped (Cloudflare Access
/// answers a service-token request with `Set-Cookie: CF_Authorization=<JWT>`, a credential for
/// the node's hostname that no caller may hold), and so are Access's own headers, hop-by-hop
/// headers and the node's load report (`x-edgerun-load`, the Worker's to read).
pub fn keep_response_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    !(name == "set-cookie"
        || name == "set-cookie2"
        || name == edgerun_protocol::LOAD_HEADER
        || name.starts_with("cf-access-")
        || matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-authenticate"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
        ))
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("access_client_id", &self.access_client_id)
            .field("access_client_secret", &self.access_client_secret.is_some())
            .field("node_token", &self.node_token.is_some())
            .finish()
    }
}

/// The id for this request: the node's rule, from `edgerun-protocol` (the caller's
/// `cf-ai-req-id` when it is 1-128 visible ASCII characters, otherwise a fresh one).
pub use edgerun_protocol::request_id;

/// A node's `origin` + the caller's path and query, unchanged.
pub fn upstream_url(origin: &str, path_and_query: &str) -> String {
    let origin = origin.trim_end_matches('/');
    if path_and_query.starts_with('/') {
        format!("{origin}{path_and_query}")
    } else {
        format!("{origin}/{path_and_query}")
    }
}

/// `cf-*` request headers that are part of an API's request rather than Cloudflare's: the
/// Workers binding's model and SDK version (reference §6.1). Every other `cf-*` header stays.
const FORWARDED_CF: &[&str] = &[
    edgerun_protocol::binding::MODEL_HEADER,
    "cf-consn-sdk-version",
];

/// The headers for the node: the caller's, minus [`DROPPED`], the headers the caller's
/// `Connection` header names, and every `cf-*` header the caller or Cloudflare set (the runtime
/// adds its own) except the binding's own ([`FORWARDED_CF`]); plus the request id, the caller's address in `x-forwarded-for`, the Access
/// service token and, when `node_token` is set, the node's bearer token (API routes need it;
/// `/health` does not, and gets no more credentials than it needs).
pub fn upstream_headers(
    incoming: &[(String, String)],
    credentials: &NodeCredentials,
    request_id: &str,
    node_token: bool,
) -> Vec<(String, String)> {
    let connection_options = connection_options(incoming);
    let mut out: Vec<(String, String)> = incoming
        .iter()
        .filter(|(name, _)| {
            let name = name.to_ascii_lowercase();
            !DROPPED.contains(&name.as_str())
                && (!name.starts_with("cf-") || FORWARDED_CF.contains(&name.as_str()))
                && !connection_options.contains(&name)
        })
        .cloned()
        .collect();
    out.push((REQUEST_ID_HEADER.into(), request_id.into()));
    if let Some((_, ip)) = incoming
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("cf-connecting-ip"))
    {
        out.push(("x-forwarded-for".into(), ip.clone()));
    }
    if let Some(id) = &credentials.access_client_id {
        out.push((ACCESS_CLIENT_ID_HEADER.into(), id.clone()));
    }
    if let Some(secret) = &credentials.access_client_secret {
        out.push((ACCESS_CLIENT_SECRET_HEADER.into(), secret.clone()));
    }
    if let Some(token) = credentials.node_token.as_ref().filter(|_| node_token) {
        out.push(("authorization".into(), format!("Bearer {token}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(origin: &str) -> Region {
        Region {
            name: "eu".into(),
            origin: None,
            origins: vec![origin.into()],
            continents: vec![],
            countries: vec![],
            colos: vec![],
            token_secret: None,
            models: None,
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn urls_keep_path_and_query() {
        assert_eq!(
            upstream_url("https://eu.example.com/", "/run/@cf%2Fmeta%2Fx?a=1"),
            "https://eu.example.com/run/@cf%2Fmeta%2Fx?a=1"
        );
        assert_eq!(
            upstream_url("http://127.0.0.1:81", "health"),
            "http://127.0.0.1:81/health"
        );
    }

    #[test]
    fn caller_credentials_are_replaced_by_the_nodes() {
        let incoming = h(&[
            ("Authorization", "Bearer caller-token"),
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("CF-Access-Client-Id", "forged"),
            ("cf-access-client-secret", "forged"),
            ("cf-access-jwt-assertion", "forged"),
            ("cf-connecting-ip", "203.0.113.7"),
            ("cf-ai-req-id", "caller-id"),
            ("cf-ray", "abc"),
            ("cf-consn-model-id", "@cf/meta/x"),
            ("CF-Consn-Sdk-Version", "2.0.0"),
            ("cf-consn-other", "dropped"),
            ("Host", "worker.example.com"),
            ("Connection", "keep-alive"),
            ("Content-Length", "12"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("x-custom", "kept"),
        ]);
        let creds = NodeCredentials {
            access_client_id: Some("id.access".into()),
            access_client_secret: Some("s3cret".into()),
            node_token: Some("node-token".into()),
        };
        let out = upstream_headers(&incoming, &creds, "rid-1", true);
        assert_eq!(
            out,
            h(&[
                ("Content-Type", "application/json"),
                ("Accept", "text/event-stream"),
                ("cf-consn-model-id", "@cf/meta/x"),
                ("CF-Consn-Sdk-Version", "2.0.0"),
                ("x-custom", "kept"),
                ("cf-ai-req-id", "rid-1"),
                ("x-forwarded-for", "203.0.113.7"),
                ("cf-access-client-id", "id.access"),
                ("cf-access-client-secret", "s3cret"),
                ("authorization", "Bearer node-token"),
            ])
        );
    }

    #[test]
    fn cookies_and_hop_by_hop_headers_stay_with_the_caller() {
        let incoming = h(&[
            ("Cookie", "session=caller"),
            ("cookie2", "$Version=1"),
            ("Connection", "keep-alive, X-Hop-Secret , upgrade"),
            ("connection", "x-second-hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "x-checksum"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Authenticate", "Basic"),
            ("X-Hop-Secret", "only for the next hop"),
            ("X-Second-Hop", "also"),
            ("Content-Type", "application/json"),
            ("x-end-to-end", "kept"),
        ]);
        let out = upstream_headers(&incoming, &NodeCredentials::default(), "rid", false);
        assert_eq!(
            out,
            h(&[
                ("Content-Type", "application/json"),
                ("x-end-to-end", "kept"),
                ("cf-ai-req-id", "rid"),
            ])
        );
        // A Connection header cannot remove what the Worker itself adds.
        let creds = NodeCredentials {
            access_client_id: Some("id".into()),
            access_client_secret: Some("secret".into()),
            node_token: Some("tok".into()),
        };
        let incoming = h(&[(
            "Connection",
            "authorization, cf-access-client-id, cf-access-client-secret, cf-ai-req-id",
        )]);
        let out = upstream_headers(&incoming, &creds, "rid", true);
        assert_eq!(
            out,
            h(&[
                ("cf-ai-req-id", "rid"),
                ("cf-access-client-id", "id"),
                ("cf-access-client-secret", "secret"),
                ("authorization", "Bearer tok"),
            ])
        );
    }

    #[test]
    fn the_node_token_goes_only_where_it_is_needed() {
        let creds = NodeCredentials {
            access_client_id: Some("id".into()),
            access_client_secret: Some("secret".into()),
            node_token: Some("tok".into()),
        };
        let out = upstream_headers(&[], &creds, "rid", false);
        assert_eq!(
            out,
            h(&[
                ("cf-ai-req-id", "rid"),
                ("cf-access-client-id", "id"),
                ("cf-access-client-secret", "secret"),
            ])
        );
    }

    #[test]
    fn missing_credentials_are_not_invented() {
        let out = upstream_headers(&[], &NodeCredentials::default(), "r", true);
        assert_eq!(out, h(&[("cf-ai-req-id", "r")]));
        // and Debug never prints secrets
        let creds = NodeCredentials {
            access_client_id: Some("id".into()),
            access_client_secret: Some("s3cret".into()),
            node_token: Some("tok3n".into()),
        };
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("tok3n"), "{dbg}");
    }

    #[test]
    fn every_credential_is_required() {
        let mut r = region("https://eu");
        r.token_secret = Some("NODE_TOKEN_EU".into());
        let all = |name: &str| Some(format!("value-of-{name}"));
        let creds = NodeCredentials::for_region(&r, all).unwrap();
        assert_eq!(creds.node_token.as_deref(), Some("value-of-NODE_TOKEN_EU"));
        assert_eq!(
            creds.access_client_id.as_deref(),
            Some("value-of-ACCESS_CLIENT_ID")
        );
        for missing in ["ACCESS_CLIENT_ID", "ACCESS_CLIENT_SECRET", "NODE_TOKEN_EU"] {
            let lookup = |name: &str| (name != missing).then(|| "x".to_string());
            let e = NodeCredentials::for_region(&r, lookup).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("the Worker is misconfigured: the secret {missing} is not set")
            );
            let empty = |name: &str| {
                Some(if name == missing {
                    String::new()
                } else {
                    "x".into()
                })
            };
            assert!(NodeCredentials::for_region(&r, empty).is_err());
        }
    }

    #[test]
    fn access_cookies_never_reach_the_caller() {
        for dropped in [
            "Set-Cookie",
            "set-cookie",
            "cf-access-jwt-assertion",
            "CF-Access-Client-Id",
            "Connection",
            "transfer-encoding",
            "Keep-Alive",
            "proxy-connection",
            "Proxy-Authenticate",
            "Upgrade",
            "Trailer",
            "TE",
            "X-Edgerun-Load",
        ] {
            assert!(!keep_response_header(dropped), "{dropped}");
        }
        for kept in [
            "content-type",
            "cache-control",
            "x-accel-buffering",
            "retry-after",
            "cf-ai-req-id",
            "content-length",
        ] {
            assert!(keep_response_header(kept), "{kept}");
        }
    }

    #[test]
    fn request_ids_follow_the_nodes_rule() {
        // The rule itself is tested in edgerun-protocol; this pins that the Worker uses it.
        let fresh = || "fresh".to_string();
        assert_eq!(request_id(Some("abc-123"), fresh), "abc-123");
        assert_eq!(request_id(Some("has space"), fresh), "fresh");
    }
}
