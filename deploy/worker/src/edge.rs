//! Deciding at the edge, before any region is asked: the caller's token, and for run routes the
//! method, the model (when `NODES.models` lists them), the body size and the body itself — with
//! the node's own code (`edgerun-protocol`) and in the node's order, so that a bad request gets
//! byte for byte the answer the node would have given, without a round trip to a region.

use crate::config::NodesConfig;
use edgerun_protocol::{model_from_path, run_route_tail, ApiError, TokenSet, ValidatedRequest};

/// What the Worker knows of a request before reading its body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The path only (no query).
    pub path: &'a str,
    /// The `content-length` header, when sent and numeric.
    pub content_length: Option<u64>,
}

/// Methods the Worker can pass on unchanged (the Workers runtime's `fetch` knows these).
const FORWARDABLE_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

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

/// A request the Worker will pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A model run: its body must pass [`check_run_body`] first.
    Run { model: String },
    /// Any other route (`/health`, `/metrics`, ...): passed through unchanged.
    Passthrough,
}

/// Checks what does not need the body, once the caller is authenticated: a method the Worker
/// cannot forward (405/7001); a declared length over `body_limit` (413/3006); and for run routes
/// the method (405/7001), the model (400/5007, only when `NODES.models` is set), in the node's
/// order.
pub fn admit(
    head: &RequestHead<'_>,
    nodes: &NodesConfig,
    body_limit: usize,
) -> Result<Admitted, ApiError> {
    if !FORWARDABLE_METHODS.contains(&head.method) {
        return Err(ApiError::method_not_allowed());
    }
    let Some(tail) = run_route_tail(head.path) else {
        if head.content_length.is_some_and(|n| n > body_limit as u64) {
            return Err(ApiError::request_too_large(body_limit));
        }
        return Ok(Admitted::Passthrough);
    };
    if head.method != "POST" {
        return Err(ApiError::method_not_allowed());
    }
    let model = model_from_path(tail).unwrap_or_default();
    if !nodes.serves(&model) {
        return Err(ApiError::no_such_model(&model));
    }
    if head.content_length.is_some_and(|n| n > body_limit as u64) {
        return Err(ApiError::request_too_large(body_limit));
    }
    Ok(Admitted::Run { model })
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

/// Validates a run request's body exactly as the node does (size, then the input schema).
pub fn check_run_body(body: &[u8], body_limit: usize) -> Result<(), ApiError> {
    if body.len() > body_limit {
        return Err(ApiError::request_too_large(body_limit));
    }
    ValidatedRequest::from_json_bytes(body).map(|_| ())
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
    fn routes_are_classified_like_the_node() {
        let nodes = NodesConfig::parse(NODES).unwrap();
        let ok = |m, p| admit(&head(m, p), &nodes, 10);
        assert_eq!(
            ok("POST", "/run/@cf%2Fmeta%2Fx"),
            Ok(Admitted::Run {
                model: "@cf/meta/x".into()
            })
        );
        assert_eq!(
            ok("POST", "/client/v4/accounts/acc/ai/run/@cf/meta/x"),
            Ok(Admitted::Run {
                model: "@cf/meta/x".into()
            })
        );
        assert_eq!(ok("GET", "/health"), Ok(Admitted::Passthrough));
        assert_eq!(ok("GET", "/metrics"), Ok(Admitted::Passthrough));
        assert_eq!(ok("POST", "/v1/other"), Ok(Admitted::Passthrough));
        assert_eq!(
            ok("GET", "/run/@cf/meta/x"),
            Err(ApiError::method_not_allowed())
        );
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
            Err(ApiError::no_such_model("@cf/meta/y"))
        );
        h.path = "/run/@cf/meta/x";
        assert_eq!(
            admit(&h, &nodes, 100),
            Err(ApiError::request_too_large(100))
        );
        h.content_length = Some(100);
        assert!(admit(&h, &nodes, 100).is_ok());
        // Pass-through routes are held to the same limit.
        h.path = "/health";
        h.content_length = Some(101);
        assert_eq!(
            admit(&h, &nodes, 100),
            Err(ApiError::request_too_large(100))
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
            Err(ApiError::request_too_large(10))
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
            assert_eq!(edge, node);
            assert_eq!(edge.status, 400);
        }
    }
}
