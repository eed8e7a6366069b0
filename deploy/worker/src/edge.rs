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
    pub authorization: Option<&'a str>,
    /// The `content-length` header, when sent and numeric.
    pub content_length: Option<u64>,
}

/// A request the Worker will pass on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// A model run: its body must pass [`check_run_body`] first.
    Run { model: String },
    /// Any other route (`/health`, `/metrics`, ...): passed through unchanged.
    Passthrough,
}

/// Checks everything that does not need the body: the caller's token (401/10000 otherwise),
/// then, for run routes, the method (405/7001), the model (400/5007, only when `NODES.models` is
/// set) and a declared length over `body_limit` (413/3006).
pub fn admit(
    head: &RequestHead<'_>,
    tokens: &TokenSet,
    nodes: &NodesConfig,
    body_limit: usize,
) -> Result<Admitted, ApiError> {
    if !tokens.accepts_authorization(head.authorization) {
        return Err(ApiError::authentication());
    }
    let Some(tail) = run_route_tail(head.path) else {
        return Ok(Admitted::Passthrough);
    };
    if !head.method.eq_ignore_ascii_case("POST") {
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

    fn head<'a>(method: &'a str, path: &'a str, auth: Option<&'a str>) -> RequestHead<'a> {
        RequestHead {
            method,
            path,
            authorization: auth,
            content_length: None,
        }
    }

    #[test]
    fn the_callers_token_comes_first() {
        let tokens = TokenSet::parse_list("good");
        let nodes = NodesConfig::parse(NODES).unwrap();
        for path in ["/run/@cf/meta/x", "/health", "/nothing"] {
            for auth in [None, Some("Bearer bad"), Some("good")] {
                let e = admit(&head("POST", path, auth), &tokens, &nodes, 10).unwrap_err();
                assert_eq!(e, ApiError::authentication(), "{path} {auth:?}");
            }
        }
        // Even with no token configured at all.
        let e = admit(
            &head("POST", "/run/x", Some("Bearer ")),
            &TokenSet::parse_list(""),
            &nodes,
            10,
        )
        .unwrap_err();
        assert_eq!(e.status, 401);
    }

    #[test]
    fn routes_are_classified_like_the_node() {
        let tokens = TokenSet::parse_list("good");
        let nodes = NodesConfig::parse(NODES).unwrap();
        let ok = |m, p| admit(&head(m, p, Some("Bearer good")), &tokens, &nodes, 10);
        assert_eq!(
            ok("POST", "/run/@cf%2Fmeta%2Fx"),
            Ok(Admitted::Run {
                model: "@cf/meta/x".into()
            })
        );
        assert_eq!(
            ok("post", "/client/v4/accounts/acc/ai/run/@cf/meta/x"),
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
        let tokens = TokenSet::parse_list("good");
        let nodes = NodesConfig::parse(
            r#"{"models":["@cf/meta/x"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        let mut h = head("POST", "/run/@cf/meta/y", Some("Bearer good"));
        h.content_length = Some(1 << 30);
        // The node checks the model before it reads the body: so does the Worker.
        assert_eq!(
            admit(&h, &tokens, &nodes, 100),
            Err(ApiError::no_such_model("@cf/meta/y"))
        );
        h.path = "/run/@cf/meta/x";
        assert_eq!(
            admit(&h, &tokens, &nodes, 100),
            Err(ApiError::request_too_large(100))
        );
        h.content_length = Some(100);
        assert!(admit(&h, &tokens, &nodes, 100).is_ok());
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
