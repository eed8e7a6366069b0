//! # edgerun-worker
//!
//! The Cloudflare Worker (workers-rs) every client calls. It fronts the edgerun nodes of each
//! region, each reached through its Cloudflare Tunnel hostname, and answers exactly like Workers
//! AI.
//!
//! ## What it owns
//!
//! * [`config`]: the `NODES` variable (regions, their nodes' origins, which continents, countries
//!   and colos each serves, a default, optionally the models served everywhere and per region)
//!   and `MAX_BODY_BYTES`; which regions serve a model (`regions_for_model`).
//! * [`balance`]: which node of a region first — by rendezvous hashing of `x-session-affinity`,
//!   else the least loaded by the nodes' `x-edgerun-load` — and nodes that just failed last;
//!   per-isolate memory, tested with explicit clocks.
//! * [`edge`]: what is decided before any region is asked — the caller's token (`API_TOKENS`,
//!   checked with `edgerun-protocol`'s constant-time `TokenSet`, like the node's; 401/10000), the
//!   route (the node's API routes — Workers AI's runs and model catalogue, the Workers binding's
//!   `/run` and `/ai-api/models/search`, the OpenAI-compatible routes — and `/health` are
//!   forwarded; anything else gets the node's 400/7000, a wrong method its 405/7001 with
//!   `Allow`), and for generations and embeddings the model, size and body, using
//!   `edgerun-protocol`'s
//!   validation of each dialect so that the Worker's answer to a bad request is the node's, byte
//!   for byte, in the route family's error shape (`ErrorStyle`).
//! * [`forward`]: the upstream URL and headers — the caller's credentials, cookies, hop-by-hop
//!   and `cf-*` headers out; the Access service token (`CF-Access-Client-Id`/`-Secret`), the
//!   node's bearer token (run routes only) and the request id (`cf-ai-req-id`, kept when the
//!   caller sent one) in.
//! * [`failover`]: trying nodes in order — the caller's region's first, then the others' — and
//!   moving on only when the request certainly did not start on the node before.
//! * `glue` (wasm32 only): the `#[event(fetch)]` handler that reads the request and environment,
//!   calls the above, and turns the chosen node's `Response` into the caller's.
//!
//! ## How a request flows
//!
//! ```text
//! request ─▶ edge::admit (token, route, method, model, declared size) ──▶ EdgeError ─▶ caller
//!          ─▶ read body ─▶ edge::check_body (size, schema, body model) ─▶ EdgeError ─▶ caller
//!          ─▶ config::regions_for_model(request.cf, model) ─▶ balance::plan(x-session-affinity)
//!             ─▶ nodes in order
//!          ─▶ failover::forward ─▶ fetch(origin + path), no redirects
//!                 could not connect / 521-523 / 530 / edgerun-not-started: 1 / 429+3040 ─▶ next node
//!                 every node skipped ─▶ failover::no_region_error (503, or 429 if busy)
//!                 3xx, a non-node error page, a lost connection ─▶ 502 envelope, no retry
//!          ◀─ node's response, body streamed untouched, + cf-ai-req-id + x-edgerun-region/-node
//!             (its x-edgerun-load kept by balance, not passed on; failures set the node aside)
//! ```
//!
//! ## What it must never do
//!
//! * **Never buffer or re-chunk a node's answer**: the body is handed to the runtime as the
//!   stream it came as (only a 429's small body is read, to tell "busy" from other 429s).
//! * **Never send a request to a second node unless the first certainly did not start it**
//!   (see [`failover`]): a 502, a 504, a 503 without `edgerun-not-started`, a connection lost
//!   after sending may all come after tokens were generated. A fortiori, never retry after a
//!   byte reached the caller.
//! * **Never answer outside the node's error shapes**: every answer the Worker makes itself (401,
//!   400/7000, 405 with `Allow`, 413, 429, 502, 503, 500) is what the node would answer on that
//!   path (the Workers AI envelope; OpenAI's shape under `/v1/`; the binding's under `/run` and
//!   `/ai-api/`), and a region's redirect or non-node error page is replaced by a 502 in it.
//! * **Never pass the caller's credentials to a node, nor a node's credentials to the caller.**
//! * **Never panic**: a panic aborts the isolate and every request in it; configuration errors
//!   are answered as a 500 in the envelope naming the variable.
//! * Logic stays in plain Rust that `cargo test` runs on the host; the wasm glue stays thin.

pub mod balance;
pub mod config;
pub mod edge;
pub mod failover;
pub mod forward;

#[cfg(target_arch = "wasm32")]
mod glue;

use edgerun_protocol::{ApiError, ErrorStyle};

/// The Worker's one error type. Every variant reaches the caller through `From<WorkerError> for
/// ApiError`, the one place where the Worker's own failures get a status and code.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A variable or secret is missing or malformed.
    #[error("the Worker is misconfigured: {0}")]
    Config(String),
    /// The runtime failed at something that is not a node's fault (reading the request, ...).
    #[error("{0}")]
    Runtime(String),
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Config(_) => ApiError::internal(e),
            WorkerError::Runtime(detail) => {
                ApiError::bad_input(format!("could not read the request body: {detail}"))
            }
        }
    }
}

/// An answer the Worker makes itself: always the Workers AI error envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeError {
    pub error: ApiError,
    /// The `Allow` header of a 405: the methods the route takes.
    pub allow: Option<&'static str>,
    /// The region whose answer this replaces (its 3xx, an error page that is not the node's, a
    /// lost connection), returned in `x-edgerun-region` like an answer of that region.
    pub region: Option<String>,
}

impl EdgeError {
    /// 405/7001 with `Allow`, as the node answers a wrong method.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..ApiError::method_not_allowed().into()
        }
    }

    /// `error`, in place of `region`'s answer.
    pub fn from_region(error: ApiError, region: &str) -> Self {
        Self {
            region: Some(region.to_string()),
            ..error.into()
        }
    }
}

impl From<ApiError> for EdgeError {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            allow: None,
            region: None,
        }
    }
}

impl From<WorkerError> for EdgeError {
    fn from(e: WorkerError) -> Self {
        ApiError::from(e).into()
    }
}

/// Status, headers and body of an answer the Worker makes itself: the node's (`content-type:
/// application/json`, `retry-after: 1` on 429 and 503, `allow` on 405, the body in the route
/// family's `style`: OpenAI's shape under `/v1/`, the binding's under `/run` and `/ai-api/`,
/// the envelope elsewhere), plus `x-edgerun-region` when it replaces a region's answer.
pub fn error_response_parts(
    e: &EdgeError,
    style: ErrorStyle,
) -> (u16, Vec<(&'static str, String)>, String) {
    let mut headers = vec![(
        "content-type",
        edgerun_protocol::JSON_CONTENT_TYPE.to_string(),
    )];
    if let Some(secs) = e.error.retry_after() {
        headers.push(("retry-after", secs.to_string()));
    }
    if let Some(allow) = e.allow {
        headers.push(("allow", allow.to_string()));
    }
    if let Some(region) = &e.region {
        headers.push((forward::REGION_HEADER, region.clone()));
    }
    (e.error.status, headers, style.body(&e.error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misconfiguration_is_a_500_in_the_envelope() {
        let e = ApiError::from(WorkerError::Config("NODES lists no region".into()));
        assert_eq!((e.status, e.code), (500, 3000));
        assert_eq!(
            e.message,
            "AiError: Internal error: the Worker is misconfigured: NODES lists no region"
        );
    }

    #[test]
    fn error_parts_match_the_nodes() {
        let h = |pairs: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            pairs.iter().map(|(n, v)| (*n, v.to_string())).collect()
        };
        let (status, headers, body) =
            error_response_parts(&ApiError::capacity().into(), ErrorStyle::Cloudflare);
        assert_eq!(status, 429);
        assert_eq!(
            headers,
            h(&[("content-type", "application/json"), ("retry-after", "1")])
        );
        assert_eq!(body, ApiError::capacity().to_json());
        let (_, headers, _) =
            error_response_parts(&ApiError::authentication().into(), ErrorStyle::Cloudflare);
        assert_eq!(headers, h(&[("content-type", "application/json")]));

        let (status, headers, body) = error_response_parts(
            &EdgeError::method_not_allowed("POST"),
            ErrorStyle::Cloudflare,
        );
        assert_eq!(status, 405);
        assert_eq!(
            headers,
            h(&[("content-type", "application/json"), ("allow", "POST")])
        );
        assert_eq!(body, ApiError::method_not_allowed().to_json());

        let e = EdgeError::from_region(ApiError::new(502, 3000, "Bad gateway: x"), "eu");
        let (status, headers, body) = error_response_parts(&e, ErrorStyle::Cloudflare);
        assert_eq!(status, 502);
        assert_eq!(
            headers,
            h(&[
                ("content-type", "application/json"),
                ("x-edgerun-region", "eu")
            ])
        );
        assert_eq!(
            body,
            r#"{"errors":[{"code":3000,"message":"Bad gateway: x"}],"success":false,"result":null,"messages":[]}"#
        );
        // Each route family's callers get its own shape.
        for style in [ErrorStyle::OpenAi, ErrorStyle::Binding] {
            let (status, _, body) = error_response_parts(&e, style);
            assert_eq!((status, body), (502, style.body(&e.error)));
        }
    }
}
