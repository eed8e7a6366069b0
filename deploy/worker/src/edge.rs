//! Deciding at the edge, before any region is asked: the caller's token, the route (only the
//! node's run routes and `/health` are forwarded), the method, and for run routes the model
//! (when `NODES.models` lists them), the body size and the body itself — with the node's own
//! code (`edgerun-protocol`) and in the node's order, so that a bad request gets byte for byte
//! the answer the node would have given, without a round trip to a region.

use crate::config::NodesConfig;
use crate::EdgeError;
use edgerun_protocol::{model_from_path, ApiError, NodeRoute, TokenSet, ValidatedRequest};

/// What the Worker knows of a request before reading its body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The path only (no query).
    pub path: &'a str,
    /// The `content-length` header, when sent and numeric.
    pub content_length: Option<u64>,
}

/// The caller's token, checked before anything else — before the configuration is even read, so
/// that nothing about the deployment reaches an unauthenticated caller. 401/10000 otherwise
/// (also when no token is configured: the Worker never runs open by accident).
pub fn authenticate(authorization: Option<&str>, tokens: &TokenSet) -> Result<(), ApiError> {
    if tokens.accepts_authorization(authorization) {
        Ok(())
    } else {
        Err(ApiError::authentication())
    }
}

/// A request the Worker will pass on: only the node's routes the Worker's callers may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A model run: its body must pass [`check_run_body`] first.
    Run { model: String },
    /// `GET`/`HEAD /health`: passed through, query string and all.
    Health,
}

impl Admitted {
    /// Whether the node's bearer token goes with the request. Run routes need it; `/health` is
    /// open at the node and gets only the Access service token (without which it would not pass
    /// Access at all): no credential travels where it is not needed.
    pub fn sends_node_token(&self) -> bool {
        matches!(self, Admitted::Run { .. })
    }
}

/// Checks what does not need the body, once the caller is authenticated, in the node's order:
///
/// * the route: only the node's run routes and `/health` are forwarded. Any other path gets the
///   node's 400/7000 (`No route for that URI`) from the Worker, whatever the method, so nothing
///   but those two routes ever leaves with the node's credentials. `/metrics` is among them: it
///   is the operator's, scraped on each node, and a Worker caller holds an API token, not an
///   operator's credential (nor could a scraper tell which region's counters it got).
/// * the method: 405/7001 with `Allow` (`POST` on run routes, `GET, HEAD` on `/health`);
/// * for run routes, the model (400/5007, only when `NODES.models` is set);
/// * a declared length over `body_limit` (413/3006).
pub fn admit(
    head: &RequestHead<'_>,
    nodes: &NodesConfig,
    body_limit: usize,
) -> Result<Admitted, EdgeError> {
    let route = NodeRoute::of(head.path);
    let admitted = match route {
        // The OpenAI-compatible routes are not forwarded (yet): answered as before, no route.
        NodeRoute::Unknown | NodeRoute::Metrics | NodeRoute::OpenAi(_) => {
            return Err(ApiError::no_route().into())
        }
        _ if !route.allows(head.method) => {
            return Err(EdgeError::method_not_allowed(route.allow()))
        }
        NodeRoute::Health => Admitted::Health,
        NodeRoute::Run(tail) => {
            let model = model_from_path(tail).unwrap_or_default();
            if !nodes.serves(&model) {
                return Err(ApiError::no_such_model(&model).into());
            }
            Admitted::Run { model }
        }
    };
    if head.content_length.is_some_and(|n| n > body_limit as u64) {
        return Err(ApiError::request_too_large(body_limit).into());
    }
    Ok(admitted)
}

/// A request body read chunk by chunk, refused (413/3006, the node's error) as soon as it grows
/// past the limit: a body without `content-length` cannot make the Worker hold more than the
/// limit in memory.
#[derive(Debug)]
pub struct LimitedBody {
    limit: usize,
    bytes: Vec<u8>,
}

impl LimitedBody {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            bytes: Vec::new(),
        }
    }

    /// Appends a chunk, or fails once the body exceeds the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        if self.bytes.len() + chunk.len() > self.limit {
            return Err(ApiError::request_too_large(self.limit));
        }
        self.bytes.extend_from_slice(chunk);
        Ok(())
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Validates a run request's body exactly as the node does (size, then the input schema). The
/// node's one 405 about a body (5005, `lora`) gets `Allow: POST`, as every 405 should.
pub fn check_run_body(body: &[u8], body_limit: usize) -> Result<(), EdgeError> {
    if body.len() > body_limit {
        return Err(ApiError::request_too_large(body_limit).into());
    }
    ValidatedRequest::from_json_bytes(body)
        .map(|_| ())
        .map_err(|error| EdgeError {
            allow: (error.status == 405).then_some(NodeRoute::RUN_METHODS),
            ..error.into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = r#"{"regions":[{"name":"a","origin":"https://a"}]}"#;

    fn head<'a>(method: &'a str, path: &'a str) -> RequestHead<'a> {
        RequestHead {
            method,
            path,
            content_length: None,
        }
    }

    #[test]
    fn the_callers_token_is_checked_first() {
        let tokens = TokenSet::parse_list("good");
        for auth in [None, Some("Bearer bad"), Some("good"), Some("Basic good")] {
            assert_eq!(
                authenticate(auth, &tokens),
                Err(ApiError::authentication()),
                "{auth:?}"
            );
        }
        assert_eq!(authenticate(Some("Bearer good"), &tokens), Ok(()));
        // No token configured at all: everyone is refused.
        let e = authenticate(Some("Bearer "), &TokenSet::parse_list("")).unwrap_err();
        assert_eq!(e.status, 401);
    }

    #[test]
    fn only_the_nodes_routes_are_forwarded() {
        let nodes = NodesConfig::parse(NODES).unwrap();
        let ok = |m, p| admit(&head(m, p), &nodes, 10);
        let run = Ok(Admitted::Run {
            model: "@cf/meta/x".into(),
        });
        assert_eq!(ok("POST", "/run/@cf%2Fmeta%2Fx"), run);
        assert_eq!(ok("POST", "/client/v4/accounts/acc/ai/run/@cf/meta/x"), run);
        assert_eq!(ok("GET", "/health"), Ok(Admitted::Health));
        assert_eq!(ok("HEAD", "/health"), Ok(Admitted::Health));
        // Everything else is answered at the edge with the node's 400/7000, whatever the method:
        // nothing else ever leaves with the node's credentials.
        for (method, path) in [
            ("POST", "/v1/other"),
            ("GET", "/"),
            ("GET", "/metrics"),
            ("POST", "/metrics"),
            ("GET", "/health/"),
            ("GET", "/HEALTH"),
            ("GET", "/healthz"),
            ("POST", "/run/"),
            ("POST", "/run"),
            ("POST", "/client/v4/accounts//ai/run/x"),
            ("GET", "/cdn-cgi/access/certs"),
            ("PROPFIND", "/anything"),
            ("DELETE", "/v1/chat/completions"),
        ] {
            let e = ok(method, path).unwrap_err();
            assert_eq!(e, EdgeError::from(ApiError::no_route()), "{method} {path}");
            assert_eq!(e.allow, None);
        }
    }

    #[test]
    fn wrong_methods_get_the_nodes_405_with_allow() {
        let nodes = NodesConfig::parse(NODES).unwrap();
        let ok = |m, p| admit(&head(m, p), &nodes, 10);
        for method in [
            "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND",
        ] {
            let e = ok(method, "/run/@cf/meta/x").unwrap_err();
            assert_eq!(e.error, ApiError::method_not_allowed(), "{method}");
            assert_eq!(e.allow, Some("POST"));
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let e = ok(method, "/health").unwrap_err();
            assert_eq!(e.error, ApiError::method_not_allowed(), "{method}");
            assert_eq!(e.allow, Some("GET, HEAD"));
        }
        // The method is checked before the model, as the node does.
        let nodes = NodesConfig::parse(
            r#"{"models":["@cf/meta/x"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        let e = admit(&head("GET", "/run/@cf/meta/y"), &nodes, 10).unwrap_err();
        assert_eq!(e.error, ApiError::method_not_allowed());
    }

    #[test]
    fn only_run_routes_carry_the_node_token() {
        assert!(Admitted::Run { model: "m".into() }.sends_node_token());
        assert!(!Admitted::Health.sends_node_token());
    }

    #[test]
    fn listed_models_and_declared_sizes_are_checked_before_the_body() {
        let nodes = NodesConfig::parse(
            r#"{"models":["@cf/meta/x"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        let mut h = head("POST", "/run/@cf/meta/y");
        h.content_length = Some(1 << 30);
        // The node checks the model before it reads the body: so does the Worker.
        assert_eq!(
            admit(&h, &nodes, 100),
            Err(ApiError::no_such_model("@cf/meta/y").into())
        );
        h.path = "/run/@cf/meta/x";
        assert_eq!(
            admit(&h, &nodes, 100),
            Err(ApiError::request_too_large(100).into())
        );
        h.content_length = Some(100);
        assert!(admit(&h, &nodes, 100).is_ok());
        // /health is held to the same limit.
        h.method = "GET";
        h.path = "/health";
        h.content_length = Some(101);
        assert_eq!(
            admit(&h, &nodes, 100),
            Err(ApiError::request_too_large(100).into())
        );
    }

    #[test]
    fn bodies_are_refused_as_soon_as_they_pass_the_limit() {
        let mut body = LimitedBody::new(10);
        body.push(b"12345").unwrap();
        body.push(b"").unwrap();
        body.push(b"67890").unwrap();
        assert_eq!(body.push(b"x"), Err(ApiError::request_too_large(10)));
        let mut body = LimitedBody::new(10);
        assert_eq!(
            body.push(&[0; 1 << 20]),
            Err(ApiError::request_too_large(10))
        );
        let mut body = LimitedBody::new(4);
        body.push(b"ab").unwrap();
        body.push(b"cd").unwrap();
        assert_eq!(body.into_bytes(), b"abcd");
    }

    #[test]
    fn bodies_get_the_nodes_errors() {
        assert_eq!(
            check_run_body(&[b' '; 11], 10),
            Err(ApiError::request_too_large(10).into())
        );
        assert_eq!(check_run_body(br#"{"prompt":"hi"}"#, 100), Ok(()));
        for body in [
            &b"not json"[..],
            br#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
            br#"{"prompt":"a","temperature":7}"#,
            br#"{}"#,
        ] {
            let edge = check_run_body(body, 1 << 20).unwrap_err();
            let node = ValidatedRequest::from_json_bytes(body).unwrap_err();
            assert_eq!(edge, node.into());
            assert_eq!((edge.error.status, edge.allow), (400, None));
        }
        // The node's 405 about a body (LoRA): the same envelope, with Allow.
        let edge = check_run_body(br#"{"prompt":"hi","lora":"x"}"#, 1 << 20).unwrap_err();
        assert_eq!(edge.error, ApiError::lora_unsupported());
        assert_eq!(edge.allow, Some("POST"));
    }
}
