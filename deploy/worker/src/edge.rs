//! Deciding at the edge, before any region is asked: the caller's token, the route (the node's
//! API routes and `/health` are forwarded), the method, and for requests that generate the model
//! (when `NODES.models` lists them), the body size and the body itself — with the node's own code
//! (`edgerun-protocol`) and in the node's order, so that a bad request gets byte for byte the
//! answer the node would have given, without a round trip to a region.

use crate::config::NodesConfig;
use crate::EdgeError;
use edgerun_protocol::embeddings::{EmbeddingRun, OpenAiEmbeddingRequest};
use edgerun_protocol::{
    binding, model_from_path, ApiError, BindingEndpoint, NodeRoute, OpenAiBase, OpenAiEndpoint,
    OpenAiRequest, OpenAiRoute, TokenSet, ValidatedRequest,
};

/// What the Worker knows of a request before reading its body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The path only (no query).
    pub path: &'a str,
    /// The query string (without `?`), when there is one.
    pub query: Option<&'a str>,
    /// The `content-length` header, when sent and numeric.
    pub content_length: Option<u64>,
    /// The Workers binding's model header (`cf-consn-model-id`), when sent.
    pub binding_model: Option<&'a str>,
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
    /// A Workers AI run (`/run/{model}`, `.../ai/run/{model}`): its body must pass
    /// [`check_body`] first.
    Run { model: String },
    /// The Workers binding's `POST /run?version=3`, the model from `cf-consn-model-id`: its body
    /// (`{inputs, options}`) must pass [`check_body`] first.
    BindingRun { model: String },
    /// An OpenAI-compatible generation (`chat/completions`, `completions`) or `embeddings`: the
    /// model is in the body, checked by [`check_body`].
    OpenAi(OpenAiRoute),
    /// A `GET` of the node's model listings (`/v1/models`, `/v1/models/{id}`, Workers AI's
    /// `models/search` and `models/schema`, the binding's `/ai-api/models/search`): passed
    /// through, query string and all.
    Listing,
    /// `GET`/`HEAD /health`: passed through, query string and all.
    Health,
}

impl Admitted {
    /// The model a run names in its path or header (an OpenAI request names it in the body:
    /// [`check_body`] returns it).
    pub fn model(&self) -> Option<&str> {
        match self {
            Admitted::Run { model } | Admitted::BindingRun { model } => Some(model),
            _ => None,
        }
    }

    /// Whether the node's bearer token goes with the request. Every API route needs it;
    /// `/health` is open at the node and gets only the Access service token (without which it
    /// would not pass Access at all): no credential travels where it is not needed.
    pub fn sends_node_token(&self) -> bool {
        !matches!(self, Admitted::Health)
    }
}

/// Checks what does not need the body, once the caller is authenticated, in the node's order:
///
/// * the route: the node's API routes ([`NodeRoute`]: Workers AI's runs and catalogue, the
///   Workers binding's, the OpenAI-compatible ones) and `/health`. Any other path gets the
///   node's 400/7000 (`No route for that URI`) from the Worker, whatever the method, so nothing
///   else ever leaves with the node's credentials. `/metrics` is among them: it is the
///   operator's, scraped on each node, and a Worker caller holds an API token, not an
///   operator's credential (nor could a scraper tell which region's counters it got).
/// * the method: 405/7001 with `Allow` (`POST` on runs, `GET, HEAD` on listings and `/health`);
/// * for the binding's run, the protocol version (400/7000) and the model header (400/3003);
/// * for runs that name the model in the path or a header, the model (400/5007, only when
///   `NODES.models` is set);
/// * a declared length over `body_limit` (413/3006).
pub fn admit(
    head: &RequestHead<'_>,
    nodes: &NodesConfig,
    body_limit: usize,
) -> Result<Admitted, EdgeError> {
    let route = NodeRoute::of(head.path);
    let admitted = match route {
        NodeRoute::Unknown | NodeRoute::Metrics => return Err(ApiError::no_route().into()),
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
        NodeRoute::Binding(BindingEndpoint::Run) => {
            binding::check_version(head.query)?;
            let model = binding::model_from_header(head.binding_model)?;
            if !nodes.serves(&model) {
                return Err(ApiError::no_such_model(&model).into());
            }
            Admitted::BindingRun { model }
        }
        NodeRoute::Binding(BindingEndpoint::ModelsSearch) | NodeRoute::Models(_) => {
            Admitted::Listing
        }
        NodeRoute::OpenAi(route) => match route.endpoint {
            OpenAiEndpoint::Models | OpenAiEndpoint::Model => Admitted::Listing,
            OpenAiEndpoint::ChatCompletions
            | OpenAiEndpoint::Completions
            | OpenAiEndpoint::Embeddings => Admitted::OpenAi(route),
        },
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

/// Whether a run body asks for embeddings: Workers AI's embedding input (`text`) and neither
/// of text generation's (`prompt`, `messages`). The two schemas share no required field, so the
/// Worker tells them apart without knowing each model's task; a body that is neither is
/// validated as text generation, whose error the node gives too.
fn is_embedding_body(body: &[u8], binding: bool) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return false;
    };
    let input = match map.get("inputs") {
        // The binding's `{inputs, options}` (on a run route, `inputs` is an unknown field).
        Some(serde_json::Value::Object(inputs)) if binding => inputs,
        _ => &map,
    };
    let has = |k: &str| input.get(k).is_some_and(|v| !v.is_null());
    has("text") && !has("prompt") && !has("messages")
}

/// Validates a body exactly as the node does, for what the request is (size, then the input
/// schema of its dialect — text generation's, or embeddings' for a body with `text`; for OpenAI
/// requests, then the model named in the body, when `NODES` lists models: 404
/// `model_not_found` on `/v1`, 400/5007 on Workers AI's route). The node's one 405 about a body
/// (5005, `lora`) gets `Allow: POST`, as every 405 should. Listings and `/health` have no body
/// to check. Returns the model an OpenAI body names (the regions are picked by it).
pub fn check_body(
    admitted: &Admitted,
    body: &[u8],
    nodes: &NodesConfig,
    body_limit: usize,
) -> Result<Option<String>, EdgeError> {
    if body.len() > body_limit {
        return Err(ApiError::request_too_large(body_limit).into());
    }
    let served = |model: String, route: &OpenAiRoute| {
        if nodes.serves(&model) {
            Ok(Some(model))
        } else if route.base == OpenAiBase::V1 {
            Err(ApiError::model_not_found(&model))
        } else {
            Err(ApiError::no_such_model(&model))
        }
    };
    let checked = match admitted {
        Admitted::Run { .. } if is_embedding_body(body, false) => {
            EmbeddingRun::from_json_bytes(body).map(|_| None)
        }
        Admitted::Run { .. } => ValidatedRequest::from_json_bytes(body).map(|_| None),
        Admitted::BindingRun { .. } if is_embedding_body(body, true) => {
            binding::parse_embedding_body(body).map(|_| None)
        }
        Admitted::BindingRun { .. } => binding::parse_body(body).map(|_| None),
        Admitted::OpenAi(route) if route.endpoint == OpenAiEndpoint::Embeddings => {
            OpenAiEmbeddingRequest::from_json_bytes(body).and_then(|r| served(r.model, route))
        }
        Admitted::OpenAi(route) => OpenAiRequest::from_json_bytes(route.endpoint, body)
            .and_then(|request| served(request.model, route)),
        Admitted::Listing | Admitted::Health => Ok(None),
    };
    checked.map_err(|error| EdgeError {
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
            query: None,
            content_length: None,
            binding_model: None,
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
    fn the_nodes_api_routes_are_forwarded() {
        let nodes = NodesConfig::parse(NODES).unwrap();
        let ok = |m, p| admit(&head(m, p), &nodes, 10);
        let run = Ok(Admitted::Run {
            model: "@cf/meta/x".into(),
        });
        assert_eq!(ok("POST", "/run/@cf%2Fmeta%2Fx"), run);
        assert_eq!(ok("POST", "/client/v4/accounts/acc/ai/run/@cf/meta/x"), run);
        assert_eq!(ok("GET", "/health"), Ok(Admitted::Health));
        assert_eq!(ok("HEAD", "/health"), Ok(Admitted::Health));
        let openai = |base, endpoint| Ok(Admitted::OpenAi(OpenAiRoute { base, endpoint }));
        assert_eq!(
            ok("POST", "/v1/chat/completions"),
            openai(OpenAiBase::V1, OpenAiEndpoint::ChatCompletions)
        );
        assert_eq!(
            ok("POST", "/v1/completions"),
            openai(OpenAiBase::V1, OpenAiEndpoint::Completions)
        );
        assert_eq!(
            ok("POST", "/client/v4/accounts/acc/ai/v1/chat/completions"),
            openai(OpenAiBase::WorkersAi, OpenAiEndpoint::ChatCompletions)
        );
        for listing in [
            "/v1/models",
            "/v1/models/@cf%2Fmeta%2Fx",
            "/client/v4/accounts/acc/ai/models/search",
            "/client/v4/accounts/acc/ai/models/schema",
            "/ai-api/models/search",
        ] {
            assert_eq!(ok("GET", listing), Ok(Admitted::Listing), "{listing}");
            assert_eq!(ok("HEAD", listing), Ok(Admitted::Listing), "{listing}");
        }
        let mut binding = head("POST", "/run");
        binding.query = Some("version=3");
        binding.binding_model = Some("@cf/meta/x");
        assert_eq!(
            admit(&binding, &nodes, 10),
            Ok(Admitted::BindingRun {
                model: "@cf/meta/x".into()
            })
        );
        for admitted in [
            Admitted::Run { model: "m".into() },
            Admitted::BindingRun { model: "m".into() },
            Admitted::Listing,
        ] {
            assert!(admitted.sends_node_token(), "{admitted:?}");
        }
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
            ("POST", "/client/v4/accounts//ai/run/x"),
            ("GET", "/cdn-cgi/access/certs"),
            ("PROPFIND", "/anything"),
            ("POST", "/v1/models/"),
            ("GET", "/ai-api/models"),
            ("POST", "/run/"),
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
        for path in [
            "/health",
            "/v1/models",
            "/v1/models/x",
            "/ai-api/models/search",
            "/client/v4/accounts/a/ai/models/search",
        ] {
            for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
                let e = ok(method, path).unwrap_err();
                assert_eq!(e.error, ApiError::method_not_allowed(), "{method} {path}");
                assert_eq!(e.allow, Some("GET, HEAD"));
            }
        }
        for path in ["/run", "/v1/chat/completions", "/v1/completions"] {
            let e = ok("GET", path).unwrap_err();
            assert_eq!((e.error.status, e.allow), (405, Some("POST")), "{path}");
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
    fn health_alone_goes_without_the_node_token() {
        assert!(!Admitted::Health.sends_node_token());
    }

    #[test]
    fn binding_runs_are_checked_like_the_node_checks_them() {
        let nodes = NodesConfig::parse(
            r#"{"models":["@cf/meta/x"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        let run = |query, model| {
            let mut h = head("POST", "/run");
            h.query = query;
            h.binding_model = model;
            admit(&h, &nodes, 10)
        };
        for (query, model, code) in [
            (None, Some("@cf/meta/x"), 7000),
            (Some("version=2"), Some("@cf/meta/x"), 7000),
            (Some("version=3"), None, 3003),
            (Some("version=3"), Some("@cf/meta/y"), 5007),
        ] {
            let e = run(query, model).unwrap_err().error;
            assert_eq!((e.status, e.code), (400, code), "{query:?} {model:?}");
            // The node's error, exactly.
            let node = binding::check_version(query)
                .and_then(|_| binding::model_from_header(model))
                .and_then(|m| {
                    if m == "@cf/meta/x" {
                        Ok(())
                    } else {
                        Err(ApiError::no_such_model(&m))
                    }
                })
                .unwrap_err();
            assert_eq!(e, node);
        }
        assert!(run(Some("version=3"), Some("@cf/meta/x")).is_ok());
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
        let nodes = NodesConfig::parse(NODES).unwrap();
        let run = Admitted::Run { model: "m".into() };
        let check = |admitted: &Admitted, body: &[u8]| check_body(admitted, body, &nodes, 1 << 20);
        assert_eq!(
            check_body(&run, &[b' '; 11], &nodes, 10),
            Err(ApiError::request_too_large(10).into())
        );
        assert_eq!(check(&run, br#"{"prompt":"hi"}"#), Ok(None));
        for body in [
            &b"not json"[..],
            br#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
            br#"{"prompt":"a","temperature":7}"#,
            br#"{}"#,
        ] {
            let edge = check(&run, body).unwrap_err();
            let node = ValidatedRequest::from_json_bytes(body).unwrap_err();
            assert_eq!(edge, node.into());
            assert_eq!((edge.error.status, edge.allow), (400, None));
        }
        // A schema over the node's limits (finding 1 of issue 21, a `$ref` chain that once
        // overflowed the node's stack) is refused here already, with the node's exact error.
        let defs: Vec<String> = (0..300)
            .map(|i| format!(r##""d{i}":{{"$ref":"#/$defs/d{}"}}"##, i + 1))
            .collect();
        let chain = format!(
            r##"{{"$ref":"#/$defs/d0","$defs":{{{},"d300":{{"type":"string"}}}}}}"##,
            defs.join(",")
        );
        for body in [
            format!(
                r#"{{"prompt":"x","response_format":{{"type":"json_schema","json_schema":{chain}}}}}"#
            ),
            format!(r#"{{"prompt":"x","tools":[{{"name":"f","parameters":{chain}}}]}}"#),
        ] {
            let edge = check(&run, body.as_bytes()).unwrap_err();
            let node = ValidatedRequest::from_json_bytes(body.as_bytes()).unwrap_err();
            assert!(
                node.message.contains("$ref depth limit"),
                "{}",
                node.message
            );
            assert_eq!(edge, node.into());
        }
        // The node's 405 about a body (LoRA): the same envelope, with Allow.
        let edge = check(&run, br#"{"prompt":"hi","lora":"x"}"#).unwrap_err();
        assert_eq!(edge.error, ApiError::lora_unsupported());
        assert_eq!(edge.allow, Some("POST"));

        // The binding's body: {inputs, options}, with the run body's errors inside.
        let binding = Admitted::BindingRun { model: "m".into() };
        assert_eq!(
            check(&binding, br#"{"inputs":{"prompt":"hi"},"options":{}}"#),
            Ok(None)
        );
        for body in [&br#"{"prompt":"hi"}"#[..], br#"{"inputs":{"prompt":""}}"#] {
            let edge = check(&binding, body).unwrap_err();
            assert_eq!(edge, binding::parse_body(body).unwrap_err().into());
        }

        // OpenAI bodies: the dialect's validation.
        let chat = Admitted::OpenAi(OpenAiRoute {
            base: OpenAiBase::V1,
            endpoint: OpenAiEndpoint::ChatCompletions,
        });
        let ok_chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(check(&chat, ok_chat), Ok(Some("m".into())));
        let bad = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#;
        assert_eq!(
            check(&chat, bad).unwrap_err(),
            OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, bad)
                .unwrap_err()
                .into()
        );
        assert_eq!(check(&Admitted::Listing, b"anything"), Ok(None));

        // Embedding bodies (`text`, no prompt or messages): the embedding schema's errors, the
        // node's own, on every route family.
        assert_eq!(check(&run, br#"{"text":["a","b"]}"#), Ok(None));
        // On a run route `inputs` is an unknown field of a text-generation body, as at the node.
        assert_eq!(
            check(&run, br#"{"prompt":"hi","inputs":{"text":"x"}}"#),
            Ok(None)
        );
        for body in [
            &br#"{"text":""}"#[..],
            br#"{"text":["a",3]}"#,
            br#"{"text":"a","pooling":"max"}"#,
        ] {
            let edge = check(&run, body).unwrap_err();
            assert_eq!(
                edge,
                EmbeddingRun::from_json_bytes(body).unwrap_err().into()
            );
        }
        assert_eq!(check(&binding, br#"{"inputs":{"text":"a"}}"#), Ok(None));
        let bad = br#"{"inputs":{"text":[]}}"#;
        assert_eq!(
            check(&binding, bad).unwrap_err(),
            binding::parse_embedding_body(bad).unwrap_err().into()
        );
        let embeddings = Admitted::OpenAi(OpenAiRoute {
            base: OpenAiBase::V1,
            endpoint: OpenAiEndpoint::Embeddings,
        });
        assert_eq!(
            check(&embeddings, br#"{"model":"e","input":["a"]}"#),
            Ok(Some("e".into()))
        );
        let bad = br#"{"model":"e","input":""}"#;
        assert_eq!(
            check(&embeddings, bad).unwrap_err(),
            OpenAiEmbeddingRequest::from_json_bytes(bad)
                .unwrap_err()
                .into()
        );
    }

    #[test]
    fn regions_serve_their_own_models() {
        let nodes = NodesConfig::parse(
            r#"{"models":["chat"],"regions":[
                {"name":"a","origin":"https://a"},
                {"name":"b","origin":"https://b","models":["chat","embed"]}]}"#,
        )
        .unwrap();
        assert!(nodes.serves("chat") && nodes.serves("embed") && !nodes.serves("other"));
        let names = |m| {
            nodes
                .regions_for_model(&crate::config::Location::default(), m)
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Some("chat")), ["a", "b"]);
        assert_eq!(names(Some("embed")), ["b"]);
        assert_eq!(names(None), ["a", "b"]);
        let e = admit(&head("POST", "/run/other"), &nodes, 10).unwrap_err();
        assert_eq!(e.error, ApiError::no_such_model("other"));
        assert!(admit(&head("POST", "/run/embed"), &nodes, 10).is_ok());
    }

    #[test]
    fn openai_models_in_the_body_are_checked_when_listed() {
        let nodes = NodesConfig::parse(
            r#"{"models":["@cf/meta/x"],"regions":[{"name":"a","origin":"https://a"}]}"#,
        )
        .unwrap();
        let body = br#"{"model":"@cf/meta/y","messages":[{"role":"user","content":"hi"}]}"#;
        for (base, expected) in [
            (OpenAiBase::V1, ApiError::model_not_found("@cf/meta/y")),
            (OpenAiBase::WorkersAi, ApiError::no_such_model("@cf/meta/y")),
        ] {
            let admitted = Admitted::OpenAi(OpenAiRoute {
                base,
                endpoint: OpenAiEndpoint::ChatCompletions,
            });
            assert_eq!(
                check_body(&admitted, body, &nodes, 1 << 20),
                Err(expected.into())
            );
            let listed = br#"{"model":"@cf/meta/x","messages":[{"role":"user","content":"hi"}]}"#;
            assert_eq!(
                check_body(&admitted, listed, &nodes, 1 << 20),
                Ok(Some("@cf/meta/x".into()))
            );
        }
    }
}
