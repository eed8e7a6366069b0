//! Model names in URLs (reference §1.1).
//!
//! Cloudflare's documented form puts the model raw in the path
//! (`.../ai/run/@cf/meta/llama-3-8b-instruct`), while the current official
//! SDKs percent-encode the slashes (`.../ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct`).
//! Both must reach the same model here.

use percent_encoding::percent_decode_str;

use crate::error::ApiError;
pub use crate::openai::OpenAiEndpoint;
pub use crate::query::query_param;

/// Workers AI's request-id header. Every answer carries it, the node's and the Worker's.
pub const REQUEST_ID_HEADER: &str = "cf-ai-req-id";

/// Set (to `1`) by the node on answers to requests it certainly did not start: 503 while
/// loading, draining or over its connection cap, 429 / 3040 when busy, 503 when its Access keys
/// are too stale to trust. Only such answers, a 429 / 3040, or a connection that failed before
/// the request was sent let the Worker send the request to another node; anything else might
/// have generated already, so retrying it elsewhere could run it twice.
pub const NOT_STARTED_HEADER: &str = "edgerun-not-started";

/// The caller's request id when it is acceptable (1 to 128 visible ASCII characters), so that
/// logs on both sides of the edge can be joined; `None` means "make a fresh one". The node and
/// the Worker apply this same rule, so an id the Worker forwards is always kept by the node.
pub fn accepted_request_id(presented: Option<&str>) -> Option<&str> {
    presented.filter(|id| (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()))
}

/// The id for a request: the caller's when [`accepted_request_id`] keeps it, otherwise a fresh
/// one from `generate`.
pub fn request_id(presented: Option<&str>, generate: impl FnOnce() -> String) -> String {
    match accepted_request_id(presented) {
        Some(id) => id.to_owned(),
        None => generate(),
    }
}

/// The model part of a run route's path, as sent (not yet decoded), or `None`
/// when `path` is not a run route.
///
/// The run routes are `/run/{model}` and the REST form
/// `/client/v4/accounts/{account_id}/ai/run/{model}` (one non-empty account
/// segment, a non-empty model part: the node's router matches neither
/// `/run/` nor `.../ai/run/`). Both the node and the Worker in front of it classify paths with
/// this function, so they agree on which requests are model runs.
pub fn run_route_tail(path: &str) -> Option<&str> {
    let tail = match path.strip_prefix("/run/") {
        Some(tail) => tail,
        None => {
            let rest = path.strip_prefix("/client/v4/accounts/")?;
            let (account, rest) = rest.split_once('/')?;
            if account.is_empty() {
                return None;
            }
            rest.strip_prefix("ai/run/")?
        }
    };
    (!tail.is_empty()).then_some(tail)
}

/// Which of the node's OpenAI-compatible route families a path is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiBase {
    /// `/v1/...`, the base URL OpenAI's SDKs, vLLM and llama-server use. Errors are OpenAI's
    /// `{"error":{..}}`.
    V1,
    /// `/client/v4/accounts/{id}/ai/v1/...`, Workers AI's own (reference §4): only
    /// `chat/completions` and `embeddings` exist there. Errors stay Cloudflare's v4 envelope, as the service's do.
    WorkersAi,
}

/// An OpenAI-compatible route: its family and endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenAiRoute {
    /// The family (base URL).
    pub base: OpenAiBase,
    /// The endpoint under it.
    pub endpoint: OpenAiEndpoint,
}

impl OpenAiRoute {
    /// The OpenAI-compatible route at `path`, if it is one: `/v1/chat/completions`,
    /// `/v1/completions`, `/v1/embeddings`, `/v1/models`, and
    /// `/client/v4/accounts/{id}/ai/v1/{chat/completions,embeddings}` (one non-empty account
    /// segment). Workers AI documents no `completions` there and answers
    /// `models` with 405 (reference §4), so those are not routes of this family.
    pub fn of(path: &str) -> Option<Self> {
        let (base, tail) = match path.strip_prefix("/v1/") {
            Some(tail) => (OpenAiBase::V1, tail),
            None => {
                let rest = path.strip_prefix("/client/v4/accounts/")?;
                let (account, rest) = rest.split_once('/')?;
                if account.is_empty() {
                    return None;
                }
                (OpenAiBase::WorkersAi, rest.strip_prefix("ai/v1/")?)
            }
        };
        let endpoint = match (base, tail) {
            (_, "chat/completions") => OpenAiEndpoint::ChatCompletions,
            (_, "embeddings") => OpenAiEndpoint::Embeddings,
            (OpenAiBase::V1, "completions") => OpenAiEndpoint::Completions,
            (OpenAiBase::V1, "models") => OpenAiEndpoint::Models,
            (OpenAiBase::V1, tail) if tail.starts_with("models/") => {
                openai_model_id(path)?;
                OpenAiEndpoint::Model
            }
            _ => return None,
        };
        Some(Self { base, endpoint })
    }
}

/// The Workers binding's routes (reference §6.1): what workerd's `env.AI` sends to the service
/// bound as its `fetcher`, at the root of that service's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingEndpoint {
    /// `POST /run?version=3`: the model in the `cf-consn-model-id` header, the body
    /// `{"inputs":{..},"options":{..}}` ([`crate::binding`]), the bare output as the answer.
    Run,
    /// `GET /ai-api/models/search` (`env.AI.models()`): `{"result":[..]}`.
    ModelsSearch,
}

/// Workers AI's model catalogue (reference §5), under `/client/v4/accounts/{id}/ai/models/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelsEndpoint {
    /// `GET .../ai/models/search`: the v4 list envelope of the models served ([`crate::models`]).
    Search,
    /// `GET .../ai/models/schema?model=<name>`: the model's input and output JSON schemas.
    Schema,
}

impl ModelsEndpoint {
    /// The catalogue route at `path`, if it is one (one non-empty account segment).
    pub fn of(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/client/v4/accounts/")?;
        let (account, rest) = rest.split_once('/')?;
        if account.is_empty() {
            return None;
        }
        match rest {
            "ai/models/search" => Some(Self::Search),
            "ai/models/schema" => Some(Self::Schema),
            _ => None,
        }
    }
}

/// A path as the node's router sees it. The node answers `405` with [`NodeRoute::allow`] for
/// a method a route does not serve; the Worker forwards only what the node would answer, with
/// the same `Allow`, so the two cannot disagree on the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRoute<'a> {
    /// `/run/{model}` or `/client/v4/accounts/{id}/ai/run/{model}` (the tail as sent): `POST`.
    Run(&'a str),
    /// An OpenAI-compatible route ([`OpenAiRoute::of`]): `POST`, or `GET` (and `HEAD`) for
    /// `models` and `models/{id}`. The model is in the body (or, for `models`, there is none;
    /// for `models/{id}`, it is the path's tail, [`openai_model_id`]).
    OpenAi(OpenAiRoute),
    /// The Workers binding's `/run` (`POST`) and `/ai-api/models/search` (`GET`, `HEAD`).
    Binding(BindingEndpoint),
    /// Workers AI's model catalogue: `GET` (and `HEAD`).
    Models(ModelsEndpoint),
    /// `/health`: `GET` (and `HEAD`), no credentials at the node.
    Health,
    /// `/metrics`: the node's Prometheus text, for the operator's scraper.
    Metrics,
    /// Anything else: the node answers 400/7000 whatever the method.
    Unknown,
}

impl<'a> NodeRoute<'a> {
    /// The `Allow` value of the run routes.
    pub const RUN_METHODS: &'static str = "POST";
    /// The `Allow` value of `/health`, `/metrics` and the model listings.
    pub const OPEN_METHODS: &'static str = "GET, HEAD";

    /// Classifies a path (no query string).
    pub fn of(path: &'a str) -> Self {
        if let Some(tail) = run_route_tail(path) {
            return NodeRoute::Run(tail);
        }
        if let Some(route) = OpenAiRoute::of(path) {
            return NodeRoute::OpenAi(route);
        }
        if let Some(endpoint) = ModelsEndpoint::of(path) {
            return NodeRoute::Models(endpoint);
        }
        match path {
            "/run" => NodeRoute::Binding(BindingEndpoint::Run),
            "/ai-api/models/search" => NodeRoute::Binding(BindingEndpoint::ModelsSearch),
            "/health" => NodeRoute::Health,
            "/metrics" => NodeRoute::Metrics,
            _ => NodeRoute::Unknown,
        }
    }

    /// The methods the node serves on this route, as its `Allow` header lists them (empty for
    /// [`NodeRoute::Unknown`]).
    pub fn allow(&self) -> &'static str {
        match self {
            NodeRoute::Run(_) | NodeRoute::Binding(BindingEndpoint::Run) => Self::RUN_METHODS,
            NodeRoute::OpenAi(route) => match route.endpoint {
                OpenAiEndpoint::ChatCompletions
                | OpenAiEndpoint::Completions
                | OpenAiEndpoint::Embeddings => Self::RUN_METHODS,
                OpenAiEndpoint::Models | OpenAiEndpoint::Model => Self::OPEN_METHODS,
            },
            NodeRoute::Binding(BindingEndpoint::ModelsSearch)
            | NodeRoute::Models(_)
            | NodeRoute::Health
            | NodeRoute::Metrics => Self::OPEN_METHODS,
            NodeRoute::Unknown => "",
        }
    }

    /// Whether the node serves `method` on this route.
    pub fn allows(&self, method: &str) -> bool {
        self.allow().split(", ").any(|m| m == method)
    }

    /// Whether the node wants its bearer token on this route (every route but `/health` and
    /// `/metrics`, and no route at all).
    pub fn needs_token(&self) -> bool {
        !matches!(
            self,
            NodeRoute::Health | NodeRoute::Metrics | NodeRoute::Unknown
        )
    }
}

/// The model id of `/v1/models/{id}`, percent-decoded (the SDKs send `@cf%2Fmeta%2F...`), or
/// `None` when `path` is not that route.
pub fn openai_model_id(path: &str) -> Option<String> {
    let tail = path.strip_prefix("/v1/models/")?;
    model_from_path(tail)
}

/// How a route family writes an error's body; the status, `Retry-After` and the not-started
/// header do not depend on it. The node renders every error in its path's style, and the
/// Worker renders its own answers (401, 405, 413, 502, 503, ...) the same way, so a caller
/// cannot tell which of the two answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// Cloudflare's v4 envelope (`{"errors":[..],"success":false,..}`): the Workers AI routes,
    /// Workers AI's own OpenAI-compatible route (as the service answers), everything else.
    Cloudflare,
    /// OpenAI's `{"error":{"message","type","param","code"}}`: every path under `/v1/`.
    OpenAi,
    /// The Workers binding's `{"internalCode","name","message","description","errors"}`
    /// ([`crate::binding::error_body`]): `/run` and `/ai-api/...`, so that `env.AI.run` throws
    /// an error naming the code and the cause.
    Binding,
}

impl ErrorStyle {
    /// The style of the route family `path` belongs to (also for unknown paths under `/v1/` and
    /// `/ai-api/`).
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/v1/") {
            Self::OpenAi
        } else if path == "/run" || path.starts_with("/ai-api/") {
            Self::Binding
        } else {
            Self::Cloudflare
        }
    }

    /// The error's body in this style.
    pub fn body(self, error: &ApiError) -> String {
        match self {
            Self::Cloudflare => error.to_json(),
            Self::OpenAi => crate::openai::error_body(error),
            Self::Binding => crate::binding::error_body(error),
        }
    }
}

/// The model name from the path tail after `/run/` or `/ai/run/`.
///
/// Percent-decodes the tail (so `@cf%2Fmeta%2Fllama-3-8b-instruct` equals
/// `@cf/meta/llama-3-8b-instruct`), then strips one leading `/`. Returns
/// `None` when the result is empty or the decoded bytes are not UTF-8.
/// `+` is not a space in a path and is kept as is.
pub fn model_from_path(tail: &str) -> Option<String> {
    let decoded = percent_decode_str(tail).decode_utf8().ok()?;
    let model = decoded.strip_prefix('/').unwrap_or(&decoded);
    if model.is_empty() {
        None
    } else {
        Some(model.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane() {
        let fresh = || "fresh".to_string();
        assert_eq!(request_id(Some("abc-123"), fresh), "abc-123");
        assert_eq!(request_id(None, fresh), "fresh");
        assert_eq!(request_id(Some(""), fresh), "fresh");
        assert_eq!(request_id(Some("has space"), fresh), "fresh");
        assert_eq!(request_id(Some("tab\there"), fresh), "fresh");
        assert_eq!(request_id(Some("é"), fresh), "fresh");
        assert_eq!(request_id(Some(&"x".repeat(129)), fresh), "fresh");
        assert_eq!(request_id(Some(&"x".repeat(128)), fresh), "x".repeat(128));
    }

    const MODEL: &str = "@cf/meta/llama-3-8b-instruct";

    #[test]
    fn raw_and_encoded_forms_agree() {
        for tail in [
            "@cf/meta/llama-3-8b-instruct",
            "/@cf/meta/llama-3-8b-instruct",
            "@cf%2Fmeta%2Fllama-3-8b-instruct",
            "@cf%2fmeta%2fllama-3-8b-instruct",
            "%40cf%2Fmeta%2Fllama-3-8b-instruct",
            "@cf/meta%2Fllama-3-8b-instruct",
            "%2F@cf%2Fmeta%2Fllama-3-8b-instruct",
        ] {
            assert_eq!(model_from_path(tail).as_deref(), Some(MODEL), "{tail}");
        }
    }

    #[test]
    fn other_names_pass_through() {
        assert_eq!(
            model_from_path("@hf/meta-llama/meta-llama-3-8b-instruct").as_deref(),
            Some("@hf/meta-llama/meta-llama-3-8b-instruct")
        );
        assert_eq!(model_from_path("a+b").as_deref(), Some("a+b"));
        assert_eq!(model_from_path("a%20b").as_deref(), Some("a b"));
        assert_eq!(model_from_path("caf%C3%A9").as_deref(), Some("café"));
        // malformed escapes are kept literally, as percent-decoding does
        assert_eq!(model_from_path("100%").as_deref(), Some("100%"));
        assert_eq!(model_from_path("%zz").as_deref(), Some("%zz"));
    }

    #[test]
    fn run_routes_are_recognised() {
        assert_eq!(run_route_tail("/run/@cf/meta/x"), Some("@cf/meta/x"));
        assert_eq!(run_route_tail("/run/"), None);
        assert_eq!(run_route_tail("/client/v4/accounts/a/ai/run/"), None);
        assert_eq!(
            run_route_tail("/client/v4/accounts/abc123/ai/run/@cf%2Fmeta%2Fx"),
            Some("@cf%2Fmeta%2Fx")
        );
        for other in [
            "/",
            "/health",
            "/metrics",
            "/runs/x",
            "/client/v4/accounts//ai/run/x",
            "/client/v4/accounts/abc/ai/runx",
            "/client/v4/accounts/abc/def/ai/run/x",
            "/v1/chat/completions",
        ] {
            assert_eq!(run_route_tail(other), None, "{other}");
        }
    }

    #[test]
    fn node_routes_and_their_methods() {
        assert_eq!(
            NodeRoute::of("/run/@cf/meta/x"),
            NodeRoute::Run("@cf/meta/x")
        );
        assert_eq!(
            NodeRoute::of("/client/v4/accounts/a/ai/run/m"),
            NodeRoute::Run("m")
        );
        assert_eq!(NodeRoute::of("/health"), NodeRoute::Health);
        assert_eq!(NodeRoute::of("/metrics"), NodeRoute::Metrics);
        for other in ["", "/", "/health/", "/metrics/x", "/run/", "/ai/run/m"] {
            assert_eq!(NodeRoute::of(other), NodeRoute::Unknown, "{other}");
        }
        assert!(NodeRoute::Run("m").allows("POST") && !NodeRoute::Run("m").allows("GET"));
        assert!(NodeRoute::Health.allows("HEAD") && !NodeRoute::Health.allows("POST"));
        assert!(!NodeRoute::Unknown.allows("GET"));
    }

    #[test]
    fn openai_routes_and_their_methods() {
        let route = |base, endpoint| NodeRoute::OpenAi(OpenAiRoute { base, endpoint });
        use OpenAiBase::*;
        use OpenAiEndpoint::*;
        assert_eq!(
            NodeRoute::of("/v1/chat/completions"),
            route(V1, ChatCompletions)
        );
        assert_eq!(NodeRoute::of("/v1/completions"), route(V1, Completions));
        assert_eq!(NodeRoute::of("/v1/models"), route(V1, Models));
        assert_eq!(
            NodeRoute::of("/client/v4/accounts/acc/ai/v1/chat/completions"),
            route(WorkersAi, ChatCompletions)
        );
        assert_eq!(NodeRoute::of("/v1/embeddings"), route(V1, Embeddings));
        assert_eq!(
            NodeRoute::of("/client/v4/accounts/acc/ai/v1/embeddings"),
            route(WorkersAi, Embeddings)
        );
        assert!(route(V1, Embeddings).allows("POST"));
        for other in [
            "/v1/",
            "/v1/chat/completions/",
            "/v1/embeddings/",
            "/v1/models/",
            "/v1/models/%FF",
            "/v2/chat/completions",
            "/client/v4/accounts/acc/ai/v1/completions",
            "/client/v4/accounts/acc/ai/v1/models",
            "/client/v4/accounts//ai/v1/chat/completions",
            "/client/v4/accounts/a/b/ai/v1/chat/completions",
        ] {
            assert_eq!(NodeRoute::of(other), NodeRoute::Unknown, "{other}");
        }
        let chat = route(V1, ChatCompletions);
        assert!(chat.allows("POST") && !chat.allows("GET"));
        let models = route(V1, Models);
        assert!(models.allows("GET") && models.allows("HEAD") && !models.allows("POST"));
        assert_eq!(route(WorkersAi, ChatCompletions).allow(), "POST");
        // /v1/models/{id}: the id percent-decoded, slashes and all.
        for path in [
            "/v1/models/@cf/meta/llama-3-8b-instruct",
            "/v1/models/@cf%2Fmeta%2Fllama-3-8b-instruct",
        ] {
            assert_eq!(NodeRoute::of(path), route(V1, Model), "{path}");
            assert_eq!(
                openai_model_id(path).as_deref(),
                Some("@cf/meta/llama-3-8b-instruct")
            );
            assert_eq!(NodeRoute::of(path).allow(), "GET, HEAD");
        }
        assert_eq!(openai_model_id("/v1/models"), None);
    }

    #[test]
    fn binding_and_catalogue_routes_and_their_methods() {
        assert_eq!(
            NodeRoute::of("/run"),
            NodeRoute::Binding(BindingEndpoint::Run)
        );
        assert_eq!(
            NodeRoute::of("/ai-api/models/search"),
            NodeRoute::Binding(BindingEndpoint::ModelsSearch)
        );
        assert_eq!(
            NodeRoute::of("/client/v4/accounts/a/ai/models/search"),
            NodeRoute::Models(ModelsEndpoint::Search)
        );
        assert_eq!(
            NodeRoute::of("/client/v4/accounts/a/ai/models/schema"),
            NodeRoute::Models(ModelsEndpoint::Schema)
        );
        for other in [
            "/run/",
            "/ai-api/models",
            "/ai-api/models/search/",
            "/client/v4/accounts//ai/models/search",
            "/client/v4/accounts/a/ai/models",
            "/client/v4/accounts/a/b/ai/models/search",
        ] {
            assert_eq!(NodeRoute::of(other), NodeRoute::Unknown, "{other}");
        }
        assert_eq!(NodeRoute::Binding(BindingEndpoint::Run).allow(), "POST");
        for route in [
            NodeRoute::Binding(BindingEndpoint::ModelsSearch),
            NodeRoute::Models(ModelsEndpoint::Search),
            NodeRoute::Models(ModelsEndpoint::Schema),
        ] {
            assert_eq!(route.allow(), "GET, HEAD");
            assert!(route.needs_token());
        }
        assert!(!NodeRoute::Health.needs_token() && !NodeRoute::Unknown.needs_token());
        assert!(NodeRoute::Run("m").needs_token());
    }

    #[test]
    fn each_route_family_has_its_error_style() {
        use ErrorStyle::*;
        for (path, style) in [
            ("/v1/chat/completions", OpenAi),
            ("/v1/models/x", OpenAi),
            ("/v1/nothing", OpenAi),
            ("/run", Binding),
            ("/ai-api/models/search", Binding),
            ("/ai-api/other", Binding),
            ("/run/@cf/meta/x", Cloudflare),
            ("/client/v4/accounts/a/ai/models/search", Cloudflare),
            ("/client/v4/accounts/a/ai/v1/chat/completions", Cloudflare),
            ("/health", Cloudflare),
        ] {
            assert_eq!(ErrorStyle::of_path(path), style, "{path}");
        }
        let e = ApiError::capacity();
        assert_eq!(Cloudflare.body(&e), e.to_json());
        assert_eq!(OpenAi.body(&e), crate::openai::error_body(&e));
        assert_eq!(Binding.body(&e), crate::binding::error_body(&e));
    }

    #[test]
    fn empty_or_non_utf8_is_none() {
        assert_eq!(model_from_path(""), None);
        assert_eq!(model_from_path("/"), None);
        assert_eq!(model_from_path("%2F"), None);
        assert_eq!(model_from_path("%FF"), None);
        assert_eq!(model_from_path("%C3"), None);
        assert_eq!(model_from_path("model%80"), None);
    }
}
