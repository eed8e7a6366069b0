//! What the engine thread tells its handles: the shared counters ([`EngineStats`]), their
//! point-in-time copy ([`StatsSnapshot`], what the server reports) and the engine's health
//! ([`Health`], `/health`), failing after [`FAILING_AFTER`] consecutive device failures.

use crate::kv_cache::KvPool;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Consecutive device failures (failed probes, see the scheduler's docs) after which the engine
/// reports itself failing.
pub const FAILING_AFTER: usize = 3;

/// Counters shared between the engine thread and its handles.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub(crate) active: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    pub(crate) ready: AtomicBool,
    pub(crate) generated_tokens: AtomicUsize,
    pub(crate) prompt_tokens: AtomicUsize,
    /// Of `prompt_tokens`, those whose keys and values came from the prefix cache.
    pub(crate) prompt_tokens_cached: AtomicUsize,
    pub(crate) completed: AtomicUsize,
    pub(crate) cancelled: AtomicUsize,
    pub(crate) peak_batch: AtomicUsize,
    /// The engine thread has exited.
    pub(crate) stopped: AtomicBool,
    /// KV cache bytes reserved by running sequences.
    pub(crate) kv_reserved: AtomicUsize,
    /// The paged KV pool, read live (its free count changes as caches drop).
    pub(crate) pool: Option<KvPool>,
    /// Sequences failed by a step that could not run them (alone).
    pub(crate) failed_sequences: AtomicUsize,
    /// Sequences dropped because their client stopped reading.
    pub(crate) stalled: AtomicUsize,
    /// Times a sequence gave its KV blocks back to let older ones go on (paged storage).
    pub(crate) preemptions: AtomicUsize,
    /// Sequences waiting, preempted, to read their context again.
    pub(crate) preempted: AtomicUsize,
    /// Tokens sampled where the logits are (the device-first path).
    pub(crate) device_sampled: AtomicUsize,
    /// Steps run, and the engine thread's time in them: waiting for the forward pass (with
    /// device sampling and reading back its ids or logits), and its own work around it
    /// (planning, host sampling, stop rules on ids, sending ids).
    pub(crate) steps: AtomicUsize,
    pub(crate) step_forward_ns: AtomicUsize,
    pub(crate) step_host_ns: AtomicUsize,
    /// Rows the device sampler handed back to the host (it could not decide them exactly).
    pub(crate) device_rows_returned: AtomicUsize,
    /// Device failures: steps where no sequence could run and the probe failed too.
    pub(crate) device_failures: AtomicUsize,
    /// Device failures since the last successful step.
    pub(crate) consecutive_failures: AtomicUsize,
    /// The newest device failure's message.
    pub(crate) last_failure: Mutex<Option<String>>,
    /// A GPU's memory in use once the weights and the KV pool were allocated (`None` on the
    /// CPU and Metal): what steps use beyond it is their activations.
    pub(crate) device_baseline: Option<usize>,
    /// The most device memory in use beyond `device_baseline` after any step: the activations'
    /// high-water mark (freed memory stays in the driver's pool, `device/mod.rs`).
    pub(crate) activation_peak: AtomicUsize,
}

/// Whether the engine can serve, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Loading or warming up.
    Starting,
    Ready,
    /// [`FAILING_AFTER`] or more consecutive device failures; the newest one's message.
    Failing(String),
    /// The engine thread has exited.
    Stopped,
}

/// A point-in-time copy of [`EngineStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub active_sequences: usize,
    pub queued_requests: usize,
    pub ready: bool,
    pub generated_tokens_total: usize,
    pub prompt_tokens_total: usize,
    /// Of `prompt_tokens_total`, those served from the prefix cache (not computed).
    pub prompt_tokens_cached_total: usize,
    /// Full blocks of the paged pool findable by later prompts (held or not).
    pub prefix_cache_blocks: usize,
    /// Cached blocks given to new sequences because the pool needed them.
    pub prefix_cache_evictions_total: usize,
    pub requests_completed_total: usize,
    pub requests_cancelled_total: usize,
    /// Most sequences ever run in one forward pass.
    pub peak_batch_size: usize,
    /// KV cache bytes reserved by running sequences.
    pub kv_cache_reserved_bytes: usize,
    /// Free blocks of the paged KV pool (0 with contiguous caches).
    pub kv_pool_free_blocks: usize,
    /// Blocks of the paged KV pool in all (0 with contiguous caches).
    pub kv_pool_total_blocks: usize,
    /// Sequences failed because a step could not run them (alone).
    pub sequences_failed_total: usize,
    /// Sequences dropped because their client stopped reading.
    pub sequences_stalled_total: usize,
    /// Preemptions: a sequence gave its KV blocks back to let older ones go on, to read its
    /// prompt and output again once there is room (paged storage).
    pub preemptions_total: usize,
    /// Preempted sequences waiting for room (counted in `active_sequences` too).
    pub preempted_sequences: usize,
    /// Tokens sampled where the logits are, only their ids copied back (paged storage).
    pub device_sampled_tokens_total: usize,
    /// Steps run.
    pub steps_total: usize,
    /// Nanoseconds the engine thread spent in steps' forward passes (device sampling and the
    /// copy back included: on a GPU, waiting for it).
    pub step_forward_nanos_total: usize,
    /// Nanoseconds the engine thread spent in steps outside the forward pass: planning, host
    /// sampling, stop rules on ids, sending ids (the text work is the readers', off this
    /// thread: `output.rs`). On a GPU the device idles meanwhile.
    pub step_host_nanos_total: usize,
    /// Rows the device sampler handed to the host sampler (a top-k above its candidate list,
    /// a nucleus wider than it, a cut inside a tie, log-probabilities it cannot prove): their
    /// logits were copied whole.
    pub device_sampling_host_rows_total: usize,
    /// Steps where no sequence could run and a probe on a scratch cache failed too.
    pub device_failures_total: usize,
    /// Device failures since the last successful step.
    pub consecutive_device_failures: usize,
    /// On a GPU: the most memory steps have used beyond the weights and the KV pool (the
    /// activations' peak, measured from the driver's count after each step).
    pub device_activation_peak_bytes: Option<usize>,
}

impl StatsSnapshot {
    /// Two engines' figures as one node's (several text-generation models in one process):
    /// counts and sizes add up, peaks and failure runs take the larger, `ready` only when both
    /// are.
    pub fn merge(self, other: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            active_sequences: self.active_sequences + other.active_sequences,
            queued_requests: self.queued_requests + other.queued_requests,
            ready: self.ready && other.ready,
            generated_tokens_total: self.generated_tokens_total + other.generated_tokens_total,
            prompt_tokens_total: self.prompt_tokens_total + other.prompt_tokens_total,
            prompt_tokens_cached_total: self.prompt_tokens_cached_total
                + other.prompt_tokens_cached_total,
            prefix_cache_blocks: self.prefix_cache_blocks + other.prefix_cache_blocks,
            prefix_cache_evictions_total: self.prefix_cache_evictions_total
                + other.prefix_cache_evictions_total,
            requests_completed_total: self.requests_completed_total
                + other.requests_completed_total,
            requests_cancelled_total: self.requests_cancelled_total
                + other.requests_cancelled_total,
            peak_batch_size: self.peak_batch_size.max(other.peak_batch_size),
            kv_cache_reserved_bytes: self.kv_cache_reserved_bytes + other.kv_cache_reserved_bytes,
            kv_pool_free_blocks: self.kv_pool_free_blocks + other.kv_pool_free_blocks,
            kv_pool_total_blocks: self.kv_pool_total_blocks + other.kv_pool_total_blocks,
            sequences_failed_total: self.sequences_failed_total + other.sequences_failed_total,
            sequences_stalled_total: self.sequences_stalled_total + other.sequences_stalled_total,
            preemptions_total: self.preemptions_total + other.preemptions_total,
            preempted_sequences: self.preempted_sequences + other.preempted_sequences,
            device_sampled_tokens_total: self.device_sampled_tokens_total
                + other.device_sampled_tokens_total,
            steps_total: self.steps_total + other.steps_total,
            step_forward_nanos_total: self.step_forward_nanos_total
                + other.step_forward_nanos_total,
            step_host_nanos_total: self.step_host_nanos_total + other.step_host_nanos_total,
            device_sampling_host_rows_total: self.device_sampling_host_rows_total
                + other.device_sampling_host_rows_total,
            device_failures_total: self.device_failures_total + other.device_failures_total,
            consecutive_device_failures: self
                .consecutive_device_failures
                .max(other.consecutive_device_failures),
            // One device, measured from the driver's count: the larger peak.
            device_activation_peak_bytes: match (
                self.device_activation_peak_bytes,
                other.device_activation_peak_bytes,
            ) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let prefix = self
            .pool
            .as_ref()
            .map(KvPool::prefix_stats)
            .unwrap_or_default();
        StatsSnapshot {
            active_sequences: self.active.load(Ordering::Relaxed),
            queued_requests: self.queued.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
            generated_tokens_total: self.generated_tokens.load(Ordering::Relaxed),
            prompt_tokens_total: self.prompt_tokens.load(Ordering::Relaxed),
            prompt_tokens_cached_total: self.prompt_tokens_cached.load(Ordering::Relaxed),
            prefix_cache_blocks: prefix.cached_blocks,
            prefix_cache_evictions_total: prefix.evictions as usize,
            requests_completed_total: self.completed.load(Ordering::Relaxed),
            requests_cancelled_total: self.cancelled.load(Ordering::Relaxed),
            peak_batch_size: self.peak_batch.load(Ordering::Relaxed),
            kv_cache_reserved_bytes: self.kv_reserved.load(Ordering::Relaxed),
            kv_pool_free_blocks: self.pool.as_ref().map_or(0, KvPool::available),
            kv_pool_total_blocks: self.pool.as_ref().map_or(0, KvPool::total_blocks),
            sequences_failed_total: self.failed_sequences.load(Ordering::Relaxed),
            sequences_stalled_total: self.stalled.load(Ordering::Relaxed),
            preemptions_total: self.preemptions.load(Ordering::Relaxed),
            preempted_sequences: self.preempted.load(Ordering::Relaxed),
            device_sampled_tokens_total: self.device_sampled.load(Ordering::Relaxed),
            steps_total: self.steps.load(Ordering::Relaxed),
            step_forward_nanos_total: self.step_forward_ns.load(Ordering::Relaxed),
            step_host_nanos_total: self.step_host_ns.load(Ordering::Relaxed),
            device_sampling_host_rows_total: self.device_rows_returned.load(Ordering::Relaxed),
            device_failures_total: self.device_failures.load(Ordering::Relaxed),
            consecutive_device_failures: self.consecutive_failures.load(Ordering::Relaxed),
            device_activation_peak_bytes: self
                .device_baseline
                .map(|_| self.activation_peak.load(Ordering::Relaxed)),
        }
    }

    pub fn health(&self) -> Health {
        if self.stopped.load(Ordering::Relaxed) {
            Health::Stopped
        } else if !self.ready.load(Ordering::Relaxed) {
            Health::Starting
        } else if self.consecutive_failures.load(Ordering::Relaxed) >= FAILING_AFTER {
            let why = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
            Health::Failing(why.clone().unwrap_or_default())
        } else {
            Health::Ready
        }
    }

    pub(super) fn device_failed(&self, why: &str) {
        self.device_failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
    }

    pub(super) fn step_succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}
