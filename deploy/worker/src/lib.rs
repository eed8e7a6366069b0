//! # edgerun-worker
//!
//! The Cloudflare Worker (workers-rs) every client calls. It fronts one edgerun node per region,
//! each reached through its Cloudflare Tunnel hostname, and answers exactly like Workers AI.
//!
//! ## What it owns
//!
//! * [`config`]: the `NODES` variable (regions, origins, which continents, countries and colos
//!   each serves, a default, optionally the served models) and `MAX_BODY_BYTES`.
//! * [`edge`]: what is decided before any region is asked — the caller's token (`API_TOKENS`,
//!   checked with `edgerun-protocol`'s constant-time `TokenSet`, like the node's; 401/10000), and
//!   for run routes the method, model, size and body, using `edgerun-protocol`'s validation so
//!   that the Worker's answer to a bad request is the node's, byte for byte.
//! * [`forward`]: the upstream URL and headers — the caller's credentials and `cf-*` headers
//!   out; the Access service token (`CF-Access-Client-Id`/`-Secret`), the node's bearer token and
//!   the request id (`cf-ai-req-id`, kept when the caller sent one) in.
//! * [`failover`]: trying regions in order — the caller's region first, then the others — and
//!   moving on only while nothing has been sent to the caller.
//! * `glue` (wasm32 only): the `#[event(fetch)]` handler that reads the request and environment,
//!   calls the above, and turns the chosen node's `Response` into the caller's.
//!
//! ## How a request flows
//!
//! ```text
//! request ─▶ edge::admit (token, route, method, model, declared size) ──▶ ApiError ─▶ caller
//!          ─▶ read body ─▶ edge::check_run_body (size, schema) ─────────▶ ApiError ─▶ caller
//!          ─▶ config::regions_for(request.cf) ─▶ failover::forward ─▶ fetch(origin + path)
//!                 connect error / 502 / 503 / 504 / 521-523 / 530 / 429+3040 ─▶ next region
//!                 every region skipped ─▶ failover::no_region_error (503, or 429 if busy)
//!          ◀─ node's response, body streamed untouched, + cf-ai-req-id + x-edgerun-region
//! ```
//!
//! ## What it must never do
//!
//! * **Never buffer or re-chunk a node's answer**: the body is handed to the runtime as the
//!   stream it came as (only a 429's small body is read, to tell "busy" from other 429s).
//! * **Never retry after a byte reached the caller**, and never retry a request the node
//!   answered with anything but the failover statuses (a 400 is the caller's to fix).
//! * **Never pass the caller's credentials to a node, nor a node's credentials to the caller.**
//! * **Never panic**: a panic aborts the isolate and every request in it; configuration errors
//!   are answered as a 500 in the envelope naming the variable.
//! * Logic stays in plain Rust that `cargo test` runs on the host; the wasm glue stays thin.

pub mod config;
pub mod edge;
pub mod failover;
pub mod forward;

#[cfg(target_arch = "wasm32")]
mod glue;

use edgerun_protocol::ApiError;

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

/// Status, headers and body of an error the Worker answers itself: the same as the node's
/// (`content-type: application/json`, `retry-after: 1` on 429 and 503).
pub fn error_response_parts(e: &ApiError) -> (u16, Vec<(&'static str, &'static str)>, String) {
    let mut headers = vec![("content-type", edgerun_protocol::JSON_CONTENT_TYPE)];
    if let Some(secs) = e.retry_after() {
        headers.push(("retry-after", secs));
    }
    (e.status, headers, e.to_json())
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
        let (status, headers, body) = error_response_parts(&ApiError::capacity());
        assert_eq!(status, 429);
        assert_eq!(
            headers,
            [("content-type", "application/json"), ("retry-after", "1")]
        );
        assert_eq!(body, ApiError::capacity().to_json());
        let (_, headers, _) = error_response_parts(&ApiError::authentication());
        assert_eq!(headers, [("content-type", "application/json")]);
    }
}
