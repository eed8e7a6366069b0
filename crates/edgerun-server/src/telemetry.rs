//! Prometheus metrics at `GET /metrics`.
//!
//! Request outcomes and latencies are recorded where they happen (the `metrics` facade);
//! engine counters (sequences, queue, tokens) are read from the engine when scraped, so the
//! engine crate stays free of any metrics dependency.
//!
//! `edgerun_requests_total{route,status}` counts every answer the router gives, whatever the
//! dialect and whichever layer gave it (Access, the bearer check, the handler, a 429 from a
//! full queue), by the route's pattern ([`request_route`]); `/health` and `/metrics` are not
//! counted. Answers below the router are counted where they happen instead: connections over
//! the cap (`edgerun_connections_refused_total`) and requests hyper itself refused (a
//! malformed or oversized head) are not requests here.

use edgerun_engine::StatsSnapshot;
use edgerun_protocol::{BindingEndpoint, ModelsEndpoint, NodeRoute, OpenAiBase, OpenAiEndpoint};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "edgerun_requests_total";
pub const TTFT: &str = "edgerun_time_to_first_token_seconds";
pub const INTER_TOKEN: &str = "edgerun_inter_token_latency_seconds";
pub const REQUEST_DURATION: &str = "edgerun_request_duration_seconds";
pub const OPEN_CONNECTIONS: &str = "edgerun_open_connections";
pub const CONNECTIONS_REFUSED: &str = "edgerun_connections_refused_total";
pub const CONNECTIONS_TIMED_OUT: &str = "edgerun_connections_timed_out_total";
pub const BODY_TIMEOUTS: &str = "edgerun_request_body_timeouts_total";
pub const REQUESTS_CUT: &str = "edgerun_requests_cut_at_shutdown_total";
/// Inputs embedded, over every embedding model.
pub const EMBEDDING_INPUTS: &str = "edgerun_embedding_inputs_total";
/// Tokens read by embedding models (after truncation, padding excluded).
pub const EMBEDDING_TOKENS: &str = "edgerun_embedding_tokens_total";

/// Each embedding model's batching thread, by its first name: jobs waiting or running,
/// forward passes, jobs failed.
pub fn render_embedders(models: &[(String, edgerun_engine::EmbedStats)]) -> String {
    use edgerun_engine::EmbedStats;
    use std::fmt::Write;
    let mut out = String::new();
    if models.is_empty() {
        return out;
    }
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&EmbedStats) -> u64,
    );
    let series: [Series; 3] = [
        (
            "edgerun_embedding_queued_requests",
            "gauge",
            "embedding requests waiting or running",
            |s| s.queued_requests as u64,
        ),
        (
            "edgerun_embedding_batches_total",
            "counter",
            "embedding forward passes",
            |s| s.batches,
        ),
        (
            "edgerun_embedding_failed_total",
            "counter",
            "embedding requests failed by their batch",
            |s| s.failed,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, stats) in models {
            let model = label_value(model);
            let _ = writeln!(out, "{name}{{model=\"{model}\"}} {}", value(stats));
        }
    }
    out
}

/// A Prometheus label value: backslashes and double quotes escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Each text-generation model's engine, by its first name (`edgerun_model_*{model}`), beside
/// the node's totals over all of them (the unlabelled `edgerun_*` series of [`render`]):
/// health, sequences running and waiting, tokens, KV pool, failures.
pub fn render_generators(models: &[(String, StatsSnapshot, bool)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&StatsSnapshot, bool) -> usize,
    );
    let series: [Series; 8] = [
        (
            "edgerun_model_healthy",
            "gauge",
            "1 while the model's engine is loaded and not failing",
            |_, healthy| usize::from(healthy),
        ),
        (
            "edgerun_model_active_sequences",
            "gauge",
            "the model's sequences in its running batch",
            |s, _| s.active_sequences,
        ),
        (
            "edgerun_model_queued_requests",
            "gauge",
            "the model's requests waiting for a batch slot",
            |s, _| s.queued_requests,
        ),
        (
            "edgerun_model_generated_tokens_total",
            "counter",
            "tokens the model generated",
            |s, _| s.generated_tokens_total,
        ),
        (
            "edgerun_model_prompt_tokens_total",
            "counter",
            "prompt tokens the model processed",
            |s, _| s.prompt_tokens_total,
        ),
        (
            "edgerun_model_kv_pool_free_blocks",
            "gauge",
            "free blocks of the model's paged KV pool (0 with contiguous caches)",
            |s, _| s.kv_pool_free_blocks,
        ),
        (
            "edgerun_model_kv_pool_blocks",
            "gauge",
            "blocks of the model's paged KV pool (0 with contiguous caches)",
            |s, _| s.kv_pool_total_blocks,
        ),
        (
            "edgerun_model_sequences_failed_total",
            "counter",
            "the model's sequences failed because a step could not run them",
            |s, _| s.sequences_failed_total,
        ),
    ];
    if models.is_empty() {
        return out;
    }
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (model, stats, healthy) in models {
            let model = label_value(model);
            let _ = writeln!(
                out,
                "{name}{{model=\"{model}\"}} {}",
                value(stats, *healthy)
            );
        }
    }
    out
}

/// How a request to `path` is counted in [`REQUESTS`]: its `route` label, the router's pattern
/// for it (a fixed set of values, whatever paths callers send; `unknown` for paths no route
/// serves), and whether it asks for a generation (its failures are also timed in
/// [`REQUEST_DURATION`] with `outcome="error"`). `None` for `/health` and `/metrics`, which
/// probes and scrapers call all the time and are not counted.
pub fn request_route(path: &str) -> Option<(&'static str, bool)> {
    Some(match NodeRoute::of(path) {
        NodeRoute::Run(_) if path.starts_with("/run/") => ("/run/{model}", true),
        NodeRoute::Run(_) => ("/client/v4/accounts/{account_id}/ai/run/{model}", true),
        NodeRoute::OpenAi(r) => match (r.base, r.endpoint) {
            (OpenAiBase::WorkersAi, OpenAiEndpoint::Embeddings) => {
                ("/client/v4/accounts/{account_id}/ai/v1/embeddings", false)
            }
            (OpenAiBase::WorkersAi, _) => (
                "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
                true,
            ),
            (OpenAiBase::V1, OpenAiEndpoint::ChatCompletions) => ("/v1/chat/completions", true),
            (OpenAiBase::V1, OpenAiEndpoint::Completions) => ("/v1/completions", true),
            (OpenAiBase::V1, OpenAiEndpoint::Embeddings) => ("/v1/embeddings", false),
            (OpenAiBase::V1, OpenAiEndpoint::Models) => ("/v1/models", false),
            (OpenAiBase::V1, OpenAiEndpoint::Model) => ("/v1/models/{id}", false),
        },
        NodeRoute::Binding(BindingEndpoint::Run) => ("/run", true),
        NodeRoute::Binding(BindingEndpoint::ModelsSearch) => ("/ai-api/models/search", false),
        NodeRoute::Models(ModelsEndpoint::Search) => {
            ("/client/v4/accounts/{account_id}/ai/models/search", false)
        }
        NodeRoute::Models(ModelsEndpoint::Schema) => {
            ("/client/v4/accounts/{account_id}/ai/models/schema", false)
        }
        NodeRoute::Health | NodeRoute::Metrics => return None,
        NodeRoute::Unknown => ("unknown", false),
    })
}

/// Installs the process-wide recorder. `None` if one is installed already (tests build many
/// routers in one process); metrics are then simply not rendered by that router.
pub fn install() -> Option<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(TTFT.into()),
            &[
                0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(INTER_TOKEN.into()),
                &[0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.into()),
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
            )
        })
        .ok()?
        .install_recorder()
        .ok()
}

/// The exposition text: recorded metrics plus the engine's counters. `healthy` is what
/// `/health` says of the engine; `draining` whether the node is shutting down.
pub fn render(
    handle: &PrometheusHandle,
    stats: Option<StatsSnapshot>,
    healthy: bool,
    draining: bool,
) -> String {
    let mut out = handle.render();
    let s = stats.unwrap_or_default();
    let ready = u8::from(stats.is_some_and(|s| s.ready));
    let gauges = [
        (
            "edgerun_ready",
            "gauge",
            "1 once the model is loaded and warmed up",
            ready as usize,
        ),
        (
            "edgerun_healthy",
            "gauge",
            "1 while /health answers 200 for the engine (loaded, not failing)",
            usize::from(healthy),
        ),
        (
            "edgerun_draining",
            "gauge",
            "1 once the node is shutting down",
            usize::from(draining),
        ),
        (
            "edgerun_sequences_failed_total",
            "counter",
            "sequences failed because a step could not run them",
            s.sequences_failed_total,
        ),
        (
            "edgerun_sequences_stalled_total",
            "counter",
            "sequences dropped because their client stopped reading",
            s.sequences_stalled_total,
        ),
        (
            "edgerun_device_failures_total",
            "counter",
            "steps where no sequence could run and a probe step failed too",
            s.device_failures_total,
        ),
        (
            "edgerun_consecutive_device_failures",
            "gauge",
            "device failures since the last successful step (/health fails at 3)",
            s.consecutive_device_failures,
        ),
        (
            "edgerun_active_sequences",
            "gauge",
            "sequences in the running batch",
            s.active_sequences,
        ),
        (
            "edgerun_queued_requests",
            "gauge",
            "requests waiting for a batch slot",
            s.queued_requests,
        ),
        (
            "edgerun_peak_batch_size",
            "gauge",
            "most sequences run in one step",
            s.peak_batch_size,
        ),
        (
            "edgerun_kv_cache_reserved_bytes",
            "gauge",
            "KV cache reserved by running sequences",
            s.kv_cache_reserved_bytes,
        ),
        (
            "edgerun_kv_pool_free_blocks",
            "gauge",
            "free blocks of the paged KV pool (0 with contiguous caches)",
            s.kv_pool_free_blocks,
        ),
        (
            "edgerun_kv_pool_blocks",
            "gauge",
            "blocks of the paged KV pool (0 with contiguous caches)",
            s.kv_pool_total_blocks,
        ),
        (
            "edgerun_device_activation_peak_bytes",
            "gauge",
            "on a GPU: the most memory steps used beyond the weights and the KV pool (0 elsewhere)",
            s.device_activation_peak_bytes.unwrap_or(0),
        ),
        (
            "edgerun_preemptions_total",
            "counter",
            "sequences that gave their KV blocks back to let older ones go on (paged KV)",
            s.preemptions_total,
        ),
        (
            "edgerun_preempted_sequences",
            "gauge",
            "preempted sequences waiting to read their context again",
            s.preempted_sequences,
        ),
        (
            "edgerun_device_sampled_tokens_total",
            "counter",
            "tokens sampled where the logits are, only their ids copied to the host (paged KV)",
            s.device_sampled_tokens_total,
        ),
        (
            "edgerun_device_sampling_host_rows_total",
            "counter",
            "rows the device sampler handed to the host sampler (a cut or log-probabilities it could not decide exactly)",
            s.device_sampling_host_rows_total,
        ),
        (
            "edgerun_generated_tokens_total",
            "counter",
            "tokens generated",
            s.generated_tokens_total,
        ),
        (
            "edgerun_prompt_tokens_total",
            "counter",
            "prompt tokens processed",
            s.prompt_tokens_total,
        ),
        (
            "edgerun_prompt_tokens_cached_total",
            "counter",
            "prompt tokens served from the prefix cache, not computed",
            s.prompt_tokens_cached_total,
        ),
        (
            "edgerun_prompt_tokens_computed_total",
            "counter",
            "prompt tokens computed (processed less cached)",
            s.prompt_tokens_total
                .saturating_sub(s.prompt_tokens_cached_total),
        ),
        (
            "edgerun_prefix_cache_blocks",
            "gauge",
            "full KV blocks later prompts can reuse (held or evictable)",
            s.prefix_cache_blocks,
        ),
        (
            "edgerun_prefix_cache_evictions_total",
            "counter",
            "cached KV blocks evicted because the pool needed them",
            s.prefix_cache_evictions_total,
        ),
        (
            "edgerun_sequences_completed_total",
            "counter",
            "sequences finished",
            s.requests_completed_total,
        ),
        (
            "edgerun_sequences_cancelled_total",
            "counter",
            "sequences cancelled by their client",
            s.requests_cancelled_total,
        ),
        (
            "edgerun_steps_total",
            "counter",
            "engine steps run",
            s.steps_total,
        ),
    ];
    for (name, kind, help, value) in gauges {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    let seconds = [
        (
            "edgerun_step_forward_seconds_total",
            "engine thread time in forward passes (device sampling and the copy back included)",
            s.step_forward_nanos_total as f64 * 1e-9,
        ),
        (
            "edgerun_step_host_seconds_total",
            "engine thread time in steps outside the forward pass (planning, host sampling, stop rules on ids, sending ids; text work happens in the readers' tasks)",
            s.step_host_nanos_total as f64 * 1e-9,
        ),
    ];
    for (name, help, value) in seconds {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value:.6}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_bounded_label() {
        for (path, expected) in [
            (
                "/run/@cf/meta/llama-3-8b-instruct",
                Some(("/run/{model}", true)),
            ),
            (
                "/client/v4/accounts/a1/ai/run/@cf/meta/x",
                Some(("/client/v4/accounts/{account_id}/ai/run/{model}", true)),
            ),
            ("/v1/chat/completions", Some(("/v1/chat/completions", true))),
            ("/v1/completions", Some(("/v1/completions", true))),
            ("/v1/models", Some(("/v1/models", false))),
            (
                "/v1/models/@cf%2Fmeta%2Fx",
                Some(("/v1/models/{id}", false)),
            ),
            (
                "/client/v4/accounts/a1/ai/v1/chat/completions",
                Some((
                    "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
                    true,
                )),
            ),
            ("/run", Some(("/run", true))),
            (
                "/ai-api/models/search",
                Some(("/ai-api/models/search", false)),
            ),
            (
                "/client/v4/accounts/a1/ai/models/search",
                Some(("/client/v4/accounts/{account_id}/ai/models/search", false)),
            ),
            (
                "/client/v4/accounts/a1/ai/models/schema",
                Some(("/client/v4/accounts/{account_id}/ai/models/schema", false)),
            ),
            ("/v1/nothing", Some(("unknown", false))),
            ("/anything/else", Some(("unknown", false))),
            ("/health", None),
            ("/metrics", None),
        ] {
            assert_eq!(request_route(path), expected, "{path}");
        }
    }
}
