//! The engine thread: continuous batching over per-sequence KV caches.
//!
//! Each turn of the loop takes new submissions, drops cancelled sequences, admits waiting ones
//! ([`admission`]), then runs one step in three parts, as vLLM's scheduler does:
//!
//! 1. **plan** ([`plan::plan_step`], pure): which sequence decodes and which reads which prompt
//!    chunk;
//! 2. **execute**: one [`CausalLm::forward`] over the planned segments;
//! 3. **update from the output**: advance prefills, sample, let each [`Sequence`] apply its stop
//!    rules, emit events, retire finished sequences.
//!
//! ## Paged KV: growth and preemption
//!
//! With [`KvStorage::Paged`] a sequence is admitted with the blocks for its prompt and first
//! token ([`admission::startable_paged`] keeps a block of headroom per running sequence) and
//! takes more as each step's plan needs them, oldest sequence first. When the pool cannot give
//! a planned sequence its blocks, the newest running sequence is **preempted**: it gives all its
//! blocks back and waits, holding its sampler, grammar and the text already sent, until the
//! pool has room for its whole context; then, before anything new is admitted, it reads its
//! prompt and what it generated again (as a prefill, announcing nothing) and samples on as if
//! nothing had happened. Nobody fails because the pool is full: a request that could not fit
//! alone is refused at submission ([`admission::could_ever_fit`]).
//!
//! ## Faults
//!
//! A step that fails (an error or a panic in the forward pass) is retried with each of its
//! sequences alone, so only the sequences that fail alone are failed; the others go on as if
//! nothing happened (a failed forward's cache positions are rolled back, whatever the model
//! had committed). A fault that only happens in batches (running out of memory, say) costs
//! one forward per sequence on each such step; nothing backs off yet. When no sequence of the
//! step could run, a one-token probe on a scratch cache tells a broken device from bad
//! sequences: a failed probe counts a device failure, and [`FAILING_AFTER`] consecutive ones make
//! [`crate::Engine::health`] report the engine as failing. Any successful step clears it, and a
//! failing engine with nothing to do probes itself every [`IDLE_PROBE`], so it recovers even
//! when a load balancer has stopped sending it traffic.
//!
//! ## Memory after a burst
//!
//! A long prompt's KV cache is tens of allocations of a few MiB; glibc serves those from its
//! arenas once a large block has been freed (its mmap threshold adapts upwards) and keeps them
//! when they are freed, so a node's RSS would stay at the high-water mark of its busiest
//! moment. Each time the engine goes idle after work it hands freed memory back to the OS
//! ([`release_freed_memory`], `malloc_trim`): a few milliseconds, only when nothing is running.
//!
//! ## Slow readers
//!
//! Each sequence's event channel holds [`EVENT_BUFFER`] events. A sequence whose client has
//! stopped reading (its channel nearly full) is left out of the plan, so it costs no compute
//! and its buffer stays bounded; after [`SchedulerConfig::stalled_stream_timeout`] of that it
//! is dropped with a final error event, freeing its batch slot and KV cache, and counted as
//! stalled (not cancelled); its [`crate::SequenceEnd`] says so, for the server.

pub mod admission;
pub mod plan;

use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvPool, KvStorage};
use crate::models::CausalLm;
use crate::output::{Emitted, Outbox};
use crate::request::{GenerationRequest, StopReason};
use crate::sampling::{DeviceRow, Sampler};
use crate::sequence::{Sequence, SequenceParts};
use admission::KvReservation;
use plan::{plan_step, Planned, Work};
use std::collections::{BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Consecutive device failures (failed probes, see the module docs) after which the engine
/// reports itself failing.
pub const FAILING_AFTER: usize = 3;
/// How often a failing engine with nothing to do probes the device.
pub const IDLE_PROBE: Duration = Duration::from_secs(5);

/// Returns the memory the allocator holds free to the OS (see the module docs); a no-op where
/// the C library has no `malloc_trim`.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Limits that shape the batch. [`SchedulerConfig::validate`] refuses nonsensical values; the
/// engine never clamps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoding together at most; more wait in the queue.
    pub max_batch_size: usize,
    /// Requests allowed to wait for a batch slot; beyond that `submit` answers `Busy`.
    pub max_queue: usize,
    /// Prompt tokens one sequence processes per step. Smaller chunks keep the other streams
    /// flowing while a long prompt is read; larger ones read it faster.
    pub prefill_chunk: usize,
    /// Tokens per step over all sequences (decode tokens count one each).
    pub max_step_tokens: usize,
    /// Bytes of KV cache all running sequences may reserve together (each reserves prompt +
    /// `max_tokens` positions when admitted). A request that does not fit waits in the queue;
    /// one that could never fit is refused. `None`: no limit.
    pub kv_cache_budget: Option<usize>,
    /// How long a sequence whose client stopped reading its events is kept (paused, not
    /// computed) before it is dropped.
    pub stalled_stream_timeout: Duration,
    /// How KV caches are stored: per sequence (the CPU's default) or in one paged pool of
    /// `kv_cache_budget` bytes, allocated at start (GPUs' default; needs a budget).
    pub kv_storage: KvStorage,
    /// With paged storage (the device-first path), sample where the logits are
    /// ([`crate::DeviceSampler`]): only token ids come back to the host. `false` copies every
    /// row to the host sampler (the reference the tests hold the device's against). Rows that
    /// follow an output format are always sampled on the host; rows that report
    /// log-probabilities get them computed on the device too ([`crate::DeviceSampler::logprobs`]).
    pub device_sampling: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_queue: 64,
            prefill_chunk: 128,
            max_step_tokens: 256,
            kv_cache_budget: None,
            stalled_stream_timeout: Duration::from_secs(30),
            kv_storage: KvStorage::Contiguous,
            device_sampling: true,
        }
    }
}

impl SchedulerConfig {
    /// Defaults sized for a GPU: many sequences per step and long prompts read in few steps,
    /// where the CPU defaults ([`SchedulerConfig::default`]) keep a 2-core box's steps short.
    /// A decode step's cost on a GPU is mostly reading the weights once, so batching 64
    /// sequences costs little more than one; prompts are read 2048 tokens at a time.
    pub fn gpu_default() -> Self {
        Self {
            max_batch_size: 64,
            max_queue: 256,
            prefill_chunk: 2048,
            max_step_tokens: 4096,
            kv_storage: KvStorage::Paged {
                block_size: KvStorage::DEFAULT_BLOCK_SIZE,
            },
            ..Self::default()
        }
    }

    /// [`SchedulerConfig::default`] on the CPU, [`SchedulerConfig::gpu_default`] on CUDA; on
    /// Metal the GPU's sizes over contiguous caches (its memory is the system's: no device
    /// budget to size a pool from).
    pub fn default_for(device: &candle_core::Device) -> Self {
        match device {
            candle_core::Device::Cpu => Self::default(),
            candle_core::Device::Cuda(_) => Self::gpu_default(),
            candle_core::Device::Metal(_) => Self {
                kv_storage: KvStorage::Contiguous,
                ..Self::gpu_default()
            },
        }
    }

    /// Refuses settings the scheduler cannot run with, naming the setting. Called by
    /// [`crate::Engine::start`]; the server calls it before it listens, so a bad flag stops
    /// the node at start-up.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("prefill_chunk", self.prefill_chunk),
            ("max_step_tokens", self.max_step_tokens),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(EngineError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.kv_cache_budget == Some(0) {
            return Err(EngineError::Config(
                "kv_cache_budget must be more than 0 bytes".into(),
            ));
        }
        if let KvStorage::Paged { block_size } = self.kv_storage {
            if block_size == 0 {
                return Err(EngineError::Config(
                    "the KV pool's block size must be at least 1".into(),
                ));
            }
            if self.kv_cache_budget.is_none() {
                return Err(EngineError::Config(
                    "paged KV storage needs a KV cache budget to size its pool".into(),
                ));
            }
        }
        if self.stalled_stream_timeout.is_zero() {
            return Err(EngineError::Config(
                "stalled_stream_timeout must be more than 0".into(),
            ));
        }
        Ok(())
    }
}

/// A request as the engine thread receives it.
pub(crate) struct Submission {
    pub request: GenerationRequest,
    pub reservation: KvReservation,
    pub tx: Outbox,
}

/// Counters shared between the engine thread and its handles.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub(crate) active: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    pub(crate) ready: AtomicBool,
    pub(crate) generated_tokens: AtomicUsize,
    pub(crate) prompt_tokens: AtomicUsize,
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

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            active_sequences: self.active.load(Ordering::Relaxed),
            queued_requests: self.queued.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
            generated_tokens_total: self.generated_tokens.load(Ordering::Relaxed),
            prompt_tokens_total: self.prompt_tokens.load(Ordering::Relaxed),
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

    fn device_failed(&self, why: &str) {
        self.device_failures.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
    }

    fn step_succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// What a step gives one sampling sequence: its logits, or (sampled on the device) the token
/// already chosen there, with its log-probabilities when they are reported.
pub(crate) enum Row {
    Logits(Vec<f32>),
    Token(u32, Option<crate::StepLogprobs>),
}

/// How a sequence leaves the running batch.
enum Outcome {
    Finished(StopReason),
    Failed(String),
    /// Its output format could not be followed (the caller's schema: no finite output
    /// satisfies it, or a mask is over the grammar engine's limits): not an engine failure.
    FormatUnmet(String),
    /// Its client stopped reading for longer than the stalled-stream timeout.
    Stalled,
}

/// The loop that owns the model. Runs until every handle is dropped.
pub(crate) struct Scheduler {
    pub model: Arc<dyn CausalLm>,
    pub stop_ids: Arc<BTreeSet<u32>>,
    pub config: SchedulerConfig,
    pub stats: Arc<EngineStats>,
    pub rx: mpsc::Receiver<Submission>,
    /// The paged pool every cache is taken from, when [`SchedulerConfig::kv_storage`] is paged.
    pub pool: Option<KvPool>,
    /// The next admission's order number.
    pub next_order: std::cell::Cell<u64>,
    /// Preempted sequences (oldest first), holding no blocks, waiting for room to read their
    /// context again; they go back into the batch before anything new is admitted.
    pub preempted: std::cell::RefCell<Vec<Sequence>>,
    /// The batched sampler for the vocabulary, on the device, built when first needed.
    pub device_sampler: std::cell::OnceCell<crate::DeviceSampler>,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<Mutex<crate::faults::Faults>>,
}

impl Scheduler {
    /// Updates the shared counters that describe the running batch.
    fn publish(&self, running: &[Sequence]) {
        let preempted = self.preempted.borrow().len();
        self.stats
            .active
            .store(running.len() + preempted, Ordering::Relaxed);
        self.stats.preempted.store(preempted, Ordering::Relaxed);
        let reserved = match &self.pool {
            Some(pool) => pool.layout().bytes_for(
                pool.block_size() * running.iter().map(Sequence::blocks_held).sum::<usize>(),
            ),
            None => reserved(running),
        };
        self.stats.kv_reserved.store(reserved, Ordering::Relaxed);
    }

    pub fn run(self) {
        /// Clears `ready` however the thread ends, so `/health` stops advertising a node whose
        /// engine is gone.
        struct NotReadyOnExit(Arc<EngineStats>);
        impl Drop for NotReadyOnExit {
            fn drop(&mut self) {
                self.0.ready.store(false, Ordering::Relaxed);
                self.0.stopped.store(true, Ordering::Relaxed);
            }
        }
        let _guard = NotReadyOnExit(self.stats.clone());
        let mut waiting: VecDeque<Submission> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        // Whether anything ran since memory was last handed back.
        let mut worked = false;
        loop {
            if running.is_empty() && waiting.is_empty() && self.preempted.borrow().is_empty() {
                if std::mem::take(&mut worked) {
                    release_freed_memory();
                }
                let failing =
                    self.stats.consecutive_failures.load(Ordering::Relaxed) >= FAILING_AFTER;
                let next = if failing {
                    self.rx.recv_timeout(IDLE_PROBE)
                } else {
                    self.rx
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                };
                match next {
                    Ok(s) => waiting.push_back(s),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        match self.probe() {
                            Ok(()) => {
                                tracing::info!("the device passed a probe step; healthy again");
                                self.stats.step_succeeded();
                            }
                            Err(e) => self.stats.device_failed(&e),
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                waiting.push_back(s);
            }
            worked = true;
            self.end_by_readers(&mut running);
            self.drop_cancelled(&mut waiting, &mut running);
            self.drop_stalled(&mut running);
            self.admit(&mut waiting, &mut running);
            if !running.is_empty() {
                // The forward pass's own failures are isolated per sequence (`step`); a panic
                // anywhere else in a step (sampling, stop rules) fails the running sequences
                // and the engine goes on serving.
                match catch_unwind(AssertUnwindSafe(|| self.step(&mut running))) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Every running sequence waits for its client to read: nothing to
                        // compute until one does or a new request arrives.
                        match self.rx.recv_timeout(Duration::from_millis(5)) {
                            Ok(s) => waiting.push_back(s),
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            // No handle left to submit more: just wait for the readers.
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                        }
                    }
                    Err(_) => {
                        tracing::error!("a step panicked; failing its {} sequences", running.len());
                        self.stats
                            .failed_sequences
                            .fetch_add(running.len(), Ordering::Relaxed);
                        for seq in running.drain(..) {
                            seq.fail("internal error in the engine");
                        }
                    }
                }
            }
            self.publish(&running);
        }
    }

    /// Drops the sequences whose clients have not read their events for longer than the
    /// stalled-stream timeout.
    fn drop_stalled(&self, running: &mut Vec<Sequence>) {
        let now = Instant::now();
        let timeout = self.config.stalled_stream_timeout;
        let mut stalled = Vec::new();
        for (i, seq) in running.iter_mut().enumerate() {
            if seq.stalled_for(now) > timeout {
                stalled.push((i, Outcome::Stalled));
            }
        }
        if !stalled.is_empty() {
            tracing::warn!(
                sequences = stalled.len(),
                "dropping streams whose clients stopped reading"
            );
            self.retire(running, stalled);
        }
    }

    /// Retires the sequences whose readers found a stop string in their text (see
    /// `output.rs`), as finished: before cancellations, so a reader that found one and then
    /// went away still counts its request completed.
    fn end_by_readers(&self, running: &mut Vec<Sequence>) {
        let ended: Vec<_> = (0..running.len())
            .filter(|&i| running[i].ended_by_reader())
            .map(|i| (i, Outcome::Finished(StopReason::StopString)))
            .collect();
        self.retire(running, ended);
        let mut preempted = self.preempted.borrow_mut();
        let (ended, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut *preempted)
            .into_iter()
            .partition(Sequence::ended_by_reader);
        *preempted = waiting;
        drop(preempted);
        if !ended.is_empty() {
            self.publish(running);
        }
        for seq in ended {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            seq.finish(StopReason::StopString);
        }
    }

    fn drop_cancelled(&self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
        let before = waiting.len();
        waiting.retain(|s| !s.tx.is_closed());
        let dropped_waiting = before - waiting.len();
        if dropped_waiting > 0 {
            self.stats
                .queued
                .fetch_sub(dropped_waiting, Ordering::Relaxed);
        }
        let before = running.len();
        running.retain(|s| !s.is_cancelled());
        let mut preempted = self.preempted.borrow_mut();
        let before_preempted = preempted.len();
        preempted.retain(|s| !s.is_cancelled());
        let cancelled =
            dropped_waiting + before - running.len() + before_preempted - preempted.len();
        if cancelled > 0 {
            self.stats.cancelled.fetch_add(cancelled, Ordering::Relaxed);
            tracing::debug!(cancelled, "dropped cancelled sequences");
        }
    }

    fn admit(&self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
        let n = match &self.pool {
            None => admission::startable(
                &self.config,
                running.len(),
                reserved(running),
                waiting.iter().map(|s| &s.reservation),
            ),
            Some(pool) => {
                if !self.resume_preempted(pool, running) {
                    // First come, first served: nothing new while a preempted one waits.
                    return;
                }
                admission::startable_paged(
                    &self.config,
                    running.len(),
                    pool.available(),
                    waiting
                        .iter()
                        .map(|s| pool.blocks_for(s.request.prompt.len() + 1)),
                )
            }
        };
        let layout = self.model.kv_layout();
        for sub in waiting.drain(..n) {
            let cache = match &self.pool {
                // Its prompt and first token now; more blocks as it grows. Admission counted
                // them free: this only fails on a bug.
                Some(pool) => pool.cache(sub.request.prompt.len() + 1),
                None => KvCache::new(&layout, sub.reservation.positions, self.model.device()),
            };
            let order = self.next_order.get();
            self.next_order.set(order + 1);
            match cache {
                Ok(cache) => running.push(Sequence::new(SequenceParts {
                    sampler: Sampler::new(sub.request.sampling, &sub.request.prompt),
                    prompt: sub.request.prompt,
                    stopping: sub.request.stopping,
                    constraint: sub.request.constraint,
                    stop_ids: self.stop_ids.clone(),
                    context_length: self.model.config().context_length,
                    kv_bytes: sub.reservation.bytes,
                    cache,
                    tx: sub.tx,
                    order,
                })),
                Err(e) => {
                    sub.tx.send(Emitted::Failed(format!(
                        "cannot allocate the KV cache: {e}"
                    )));
                }
            }
            // Counted as active before it stops counting as queued, so that `submit` never
            // sees fewer sequences in flight than there are.
            self.publish(running);
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Paged storage: puts preempted sequences back into the batch, oldest first, each with
    /// the blocks to read its whole context again, while the pool has them (and a block of
    /// headroom per running sequence). `true` when none is left waiting.
    fn resume_preempted(&self, pool: &KvPool, running: &mut Vec<Sequence>) -> bool {
        let mut preempted = self.preempted.borrow_mut();
        while let Some(seq) = preempted.first_mut() {
            let need = pool.blocks_for(seq.positions_to_resume());
            if running.len() >= self.config.max_batch_size
                || pool.available() < need + running.len()
                || !seq.reserve_to_resume()
            {
                break;
            }
            running.push(preempted.remove(0));
        }
        preempted.is_empty()
    }

    /// Paged storage: the pool cannot give every planned sequence the blocks its step needs.
    /// The newest running sequence gives its blocks back and waits to read its context again
    /// ([`Sequence::preempt`]); `false` when it is the only one (then nothing can make room:
    /// admission never lets that happen, so it is failed rather than preempted forever).
    fn preempt_newest(&self, pool: &KvPool, running: &mut Vec<Sequence>) -> bool {
        let Some(newest) = (0..running.len()).max_by_key(|&i| running[i].order) else {
            return false;
        };
        if running.len() == 1 {
            let seq = running.swap_remove(newest);
            self.stats.failed_sequences.fetch_add(1, Ordering::Relaxed);
            seq.fail("the KV pool cannot hold this sequence");
            return false;
        }
        let mut seq = running.swap_remove(newest);
        seq.preempt(pool.empty_cache());
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            free_blocks = pool.available(),
            running = running.len(),
            "KV pool full: preempted the newest sequence"
        );
        let mut preempted = self.preempted.borrow_mut();
        let at = preempted.partition_point(|s| s.order < seq.order);
        preempted.insert(at, seq);
        true
    }

    /// The step's plan, with (paged) the blocks every planned sequence needs taken, oldest
    /// first, preempting the newest sequences until they fit.
    fn plan(&self, running: &mut Vec<Sequence>) -> Vec<Planned> {
        loop {
            let progress: Vec<_> = running.iter().map(Sequence::progress).collect();
            let plan = plan_step(&progress, &self.config);
            let Some(pool) = &self.pool else {
                return plan;
            };
            let mut by_age: Vec<&Planned> = plan.iter().collect();
            by_age.sort_by_key(|p| running[p.seq].order);
            if by_age.into_iter().all(|p| running[p.seq].grow_for(p.work)) {
                return plan;
            }
            if !self.preempt_newest(pool, running) {
                return Vec::new();
            }
            self.publish(running);
        }
    }

    /// One step: plan, execute, update from the output. `false` when nothing could be planned
    /// (every running sequence waits for its client).
    fn step(&self, running: &mut Vec<Sequence>) -> bool {
        let start = std::time::Instant::now();
        let plan = self.plan(running);
        if plan.is_empty() {
            return false;
        }
        // `execute` and `update_from_output` index by it.
        debug_assert!(plan.windows(2).all(|w| w[0].seq < w[1].seq));
        self.stats
            .peak_batch
            .fetch_max(plan.len(), Ordering::Relaxed);
        let mut outcomes = Vec::new();
        let forward_start = std::time::Instant::now();
        let executed = self.execute(running, &plan);
        let forward = forward_start.elapsed();
        match executed {
            Ok(logits) => {
                self.stats.step_succeeded();
                self.update_from_output(running, &plan, logits, &mut outcomes);
            }
            Err(why) => self.isolate(running, &plan, why, &mut outcomes),
        }
        self.retire(running, outcomes);
        let stats = &self.stats;
        if let Some(baseline) = stats.device_baseline {
            if let Some((free, total)) = crate::device_memory(self.model.device()) {
                let beyond = (total - free).saturating_sub(baseline);
                stats.activation_peak.fetch_max(beyond, Ordering::Relaxed);
            }
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let nanos = |d: Duration| usize::try_from(d.as_nanos()).unwrap_or(usize::MAX);
        stats
            .step_forward_ns
            .fetch_add(nanos(forward), Ordering::Relaxed);
        let host = start.elapsed().saturating_sub(forward);
        stats.step_host_ns.fetch_add(nanos(host), Ordering::Relaxed);
        true
    }

    /// After a failed step: runs each planned sequence alone, fails those that fail alone and
    /// carries on with the others; probes the device when none could run.
    fn isolate(
        &self,
        running: &mut [Sequence],
        plan: &[Planned],
        why: String,
        outcomes: &mut Vec<(usize, Outcome)>,
    ) {
        let mut ran = Vec::new();
        let mut logits = Vec::new();
        if plan.len() == 1 {
            outcomes.push((plan[0].seq, Outcome::Failed(why.clone())));
        } else {
            tracing::warn!(
                sequences = plan.len(),
                error = %why,
                "a step failed; retrying each of its sequences alone"
            );
            for p in plan {
                match self.execute(running, std::slice::from_ref(p)) {
                    Ok(rows) => {
                        ran.push(*p);
                        logits.extend(rows);
                    }
                    Err(e) => outcomes.push((p.seq, Outcome::Failed(e))),
                }
            }
        }
        tracing::error!(
            failed = outcomes.len(),
            recovered = ran.len(),
            error = %why,
            "step failed"
        );
        if !ran.is_empty() {
            self.stats.step_succeeded();
            self.update_from_output(running, &ran, logits, outcomes);
        } else if let Err(e) = self.probe() {
            tracing::error!(error = %e, "the device failed a probe step");
            self.stats.device_failed(&e);
        } else {
            // The device works: the sequences themselves could not run.
            self.stats.step_succeeded();
        }
    }

    /// One token through the model on a scratch cache: does the device still work?
    fn probe(&self) -> std::result::Result<(), String> {
        let layout = self.model.kv_layout();
        let mut cache = KvCache::new(&layout, 1, self.model.device()).map_err(|e| e.to_string())?;
        let tokens = [0u32];
        let mut segments = vec![crate::models::Segment {
            tokens: &tokens,
            cache: &mut cache,
        }];
        self.forward(&mut segments, &[0], &[None]).map(|_| ())
    }

    /// Runs the model over the planned segments; returns the logits of the sampling entries,
    /// one row each, in plan order.
    fn execute(
        &self,
        running: &mut [Sequence],
        plan: &[Planned],
    ) -> std::result::Result<Vec<Row>, String> {
        let want: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, p)| p.samples)
            .map(|(k, _)| k)
            .collect();
        // The device-first path (paged storage) samples where the logits are; the CPU's
        // copies every row (a copy costs nothing there).
        let device = self.pool.is_some() && self.config.device_sampling;
        let on_device: Vec<Option<DeviceRow>> = plan
            .iter()
            .filter(|p| p.samples)
            .map(|p| {
                let seq = &mut running[p.seq];
                (device && seq.device_samplable()).then(|| seq.device_row())
            })
            .collect();
        // The plan is in sequence order with each sequence at most once, so the segments can
        // borrow the sequences one after the other.
        let mut segments = Vec::with_capacity(plan.len());
        let mut grammars = Vec::new();
        let mut rest: &mut [Sequence] = running;
        let mut offset = 0;
        for p in plan {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(p.seq - offset);
            let (seq, tail) = tail.split_first_mut().expect("a planned sequence exists");
            let (segment, grammar) = seq.segment(p.work);
            segments.push(segment);
            if let Some(grammar) = grammar.filter(|_| p.samples) {
                grammars.push(grammar);
            }
            rest = tail;
            offset = p.seq + 1;
        }
        if grammars.is_empty() {
            return self.forward(&mut segments, &want, &on_device);
        }
        // The masks of the tokens about to be sampled depend only on what each grammar has
        // consumed: compute them beside the forward pass, not after it.
        std::thread::scope(|scope| {
            let masks = std::thread::Builder::new()
                .name("edgerun-grammar".into())
                .spawn_scoped(scope, move || {
                    for grammar in grammars {
                        grammar.prepare_mask();
                    }
                });
            let logits = self.forward(&mut segments, &want, &on_device);
            match masks {
                // `prepare_mask` catches panics; a mask still missing is computed when sampled.
                Ok(handle) => drop(handle.join()),
                Err(e) => tracing::warn!(
                    "cannot start a grammar thread ({e}); masks computed when sampling"
                ),
            }
            logits
        })
    }

    /// The model's forward pass with its failures (errors and panics) as messages, the logits
    /// copied out.
    fn forward(
        &self,
        segments: &mut [crate::models::Segment<'_>],
        want: &[usize],
        on_device: &[Option<DeviceRow>],
    ) -> std::result::Result<Vec<Row>, String> {
        let lens: Vec<usize> = segments.iter().map(|s| s.cache.len()).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            crate::faults::check(&self.faults, segments)?;
            let logits = self.model.forward(segments, want)?;
            #[cfg(feature = "fault-injection")]
            crate::faults::check_after(&self.faults, segments)?;
            Ok::<_, crate::EngineError>(logits)
        }));
        let logits = match result {
            Ok(Ok(logits)) => logits
                .map(|t| self.rows(&t, on_device))
                .transpose()
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the model panicked".into()),
        };
        match logits {
            Ok(rows) => Ok(rows.unwrap_or_default()),
            Err(e) => {
                // The model may have committed positions before it failed (its output layer,
                // or an asynchronous device error surfacing in the copy): forget them, so a
                // retry writes the same positions again.
                for (segment, len) in segments.iter_mut().zip(lens) {
                    segment.cache.roll_back_to(len);
                }
                Err(e)
            }
        }
    }

    /// The step's logits as rows for the host: the tokens of the `on_device` rows sampled
    /// where the logits are ([`crate::DeviceSampler`]), the others (and the rows the device
    /// hands back) copied whole.
    fn rows(
        &self,
        logits: &candle_core::Tensor,
        on_device: &[Option<DeviceRow>],
    ) -> candle_core::Result<Vec<Row>> {
        let device = logits.device();
        let pick = |idx: Vec<u32>| -> candle_core::Result<candle_core::Tensor> {
            let n = idx.len();
            logits.index_select(&candle_core::Tensor::from_vec(idx, n, device)?, 0)
        };
        let device_rows: Vec<u32> = (0..on_device.len() as u32)
            .filter(|&i| on_device[i as usize].is_some())
            .collect();
        let mut tokens = vec![None; on_device.len()];
        let mut logprobs: Vec<Option<crate::StepLogprobs>> = vec![None; on_device.len()];
        if !device_rows.is_empty() {
            let batch: Vec<DeviceRow> = on_device.iter().flatten().cloned().collect();
            let sample = || -> candle_core::Result<Vec<Option<u32>>> {
                #[cfg(feature = "fault-injection")]
                crate::faults::check_sampling(&self.faults)?;
                let sampler = match self.device_sampler.get() {
                    Some(s) => s,
                    None => {
                        let s = crate::DeviceSampler::new(logits.dim(1)?, device)?;
                        self.device_sampler.get_or_init(|| s)
                    }
                };
                sampler.sample(&pick(device_rows.clone())?, &batch)
            };
            // A failure of the device sampler's own operations costs this step its copies,
            // not its sequences: the host samples every row (a device that is failing fails
            // the copies too, and the step is isolated as any other failure).
            match sample() {
                Ok(picked) => {
                    for (&i, t) in device_rows.iter().zip(picked) {
                        tokens[i as usize] = t;
                    }
                }
                Err(e) => tracing::warn!("device sampling failed ({e}); sampling on the host"),
            }
            // Rows reporting log-probabilities: computed here too, from the raw rows, for the
            // tokens just drawn; a row they cannot be computed for goes to the host whole
            // (which draws the same token with the same uniform).
            let reporting: Vec<(usize, u32, usize)> = on_device
                .iter()
                .enumerate()
                .filter_map(|(i, row)| Some((i, tokens[i]?, row.as_ref()?.top_logprobs?)))
                .collect();
            if !reporting.is_empty() {
                let sampler = self.device_sampler.get().expect("built by the draw");
                let rows: Vec<u32> = reporting.iter().map(|r| r.0 as u32).collect();
                let chosen: Vec<u32> = reporting.iter().map(|r| r.1).collect();
                let top: Vec<usize> = reporting.iter().map(|r| r.2).collect();
                let computed = pick(rows).and_then(|raw| sampler.logprobs(&raw, &chosen, &top));
                let computed = computed.unwrap_or_else(|e| {
                    tracing::warn!("device log-probabilities failed ({e}); on the host");
                    vec![None; reporting.len()]
                });
                for (&(i, ..), lp) in reporting.iter().zip(computed) {
                    match lp {
                        Some(lp) => logprobs[i] = Some(lp),
                        None => tokens[i] = None,
                    }
                }
            }
            let sampled = tokens.iter().filter(|t| t.is_some()).count();
            let stats = &self.stats;
            stats.device_sampled.fetch_add(sampled, Ordering::Relaxed);
            let back = device_rows.len() - sampled;
            stats
                .device_rows_returned
                .fetch_add(back, Ordering::Relaxed);
        }
        let host_rows: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| tokens[i as usize].is_none())
            .collect();
        let mut full = match host_rows.len() {
            0 => Vec::new(),
            n if n == tokens.len() => logits.to_vec2::<f32>()?,
            _ => pick(host_rows)?.to_vec2::<f32>()?,
        }
        .into_iter();
        Ok(tokens
            .into_iter()
            .zip(logprobs)
            .map(|(t, lp)| match t {
                Some(t) => Row::Token(t, lp),
                None => Row::Logits(full.next().expect("one row per host row")),
            })
            .collect())
    }

    /// Advances prefills, samples a token for every sampling entry and notes the sequences that
    /// stop in `outcomes` (`retire` removes them).
    fn update_from_output(
        &self,
        running: &mut [Sequence],
        plan: &[Planned],
        logits: Vec<Row>,
        outcomes: &mut Vec<(usize, Outcome)>,
    ) {
        for p in plan {
            if let Work::Prefill { start, len } = p.work {
                if let Some(n) = running[p.seq].prefilled(start, len) {
                    self.stats.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                    running[p.seq].emit(Emitted::PromptProcessed { prompt_tokens: n });
                }
            }
        }
        let sampling: Vec<&Planned> = plan.iter().filter(|p| p.samples).collect();
        let sampled = sample_rows(running, &sampling, logits);
        for (p, sampled) in sampling.into_iter().zip(sampled) {
            let seq = &mut running[p.seq];
            let accepted = sampled.and_then(|token| {
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                seq.accept(token).map_err(Outcome::FormatUnmet)
            });
            match accepted {
                Ok(None) => {}
                Ok(Some(reason)) => outcomes.push((p.seq, Outcome::Finished(reason))),
                Err(outcome) => outcomes.push((p.seq, outcome)),
            }
        }
    }

    /// Removes the sequences in `outcomes` (indices into `running`, each at most once) and
    /// tells their clients, after updating the counters: anyone who has seen `Finished` also
    /// sees the sequence gone from the stats.
    fn retire(&self, running: &mut Vec<Sequence>, mut outcomes: Vec<(usize, Outcome)>) {
        if outcomes.is_empty() {
            return;
        }
        // Highest index first, so that each swap_remove moves a sequence that stays.
        outcomes.sort_unstable_by_key(|(i, _)| std::cmp::Reverse(*i));
        let gone: Vec<(Sequence, Outcome)> = outcomes
            .into_iter()
            .map(|(i, outcome)| (running.swap_remove(i), outcome))
            .collect();
        self.publish(running);
        for (seq, outcome) in gone {
            match outcome {
                Outcome::Finished(reason) => {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                    seq.finish(reason);
                }
                Outcome::Failed(why) => {
                    self.stats.failed_sequences.fetch_add(1, Ordering::Relaxed);
                    seq.fail(&why);
                }
                // The caller's format: neither a failure of the engine nor a completion.
                Outcome::FormatUnmet(why) => seq.format_unmet(&why),
                Outcome::Stalled => {
                    self.stats.stalled.fetch_add(1, Ordering::Relaxed);
                    let secs = self.config.stalled_stream_timeout.as_secs_f32();
                    seq.stall(&format!(
                        "the client did not read the stream for {secs:.0} s; generation stopped"
                    ));
                }
            }
        }
    }
}

/// Rows sampled at random (temperature above 0) from which a step samples on several threads:
/// such a row of a 128k vocabulary with top-p costs about 1 ms, so a GPU's batch of 64 would
/// hold the next step back by tens of ms on one thread. Fewer rows (and greedy rows, a mere
/// argmax) are cheaper than starting threads (measured on the 2-core CPU box: 8 greedy rows
/// on two threads lost ~10%).
const PARALLEL_SAMPLING_ROWS: usize = 16;

/// Each sampling sequence's token: taken from the row as the device picked it, or sampled from
/// its logits, on as many threads as the machine has when the rows are many (each sequence
/// samples with its own generator, so the threads change nothing but the time).
fn sample_rows(
    running: &mut [Sequence],
    sampling: &[&Planned],
    rows: Vec<Row>,
) -> Vec<std::result::Result<u32, Outcome>> {
    // The plan is in sequence order, each sequence once: pair each row with its sequence.
    let mut jobs: Vec<(&mut Sequence, Row)> = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter();
    let mut next = sampling.iter().map(|p| p.seq).peekable();
    for (i, seq) in running.iter_mut().enumerate() {
        if next.peek() == Some(&i) {
            next.next();
            jobs.push((seq, rows.next().expect("a row per sampling sequence")));
        }
    }
    let sample = |(seq, row): &mut (&mut Sequence, Row)| match row {
        Row::Logits(logits) => seq.sample(logits).map_err(Outcome::FormatUnmet),
        Row::Token(token, logprobs) => {
            seq.sampled_on_device(logprobs.take());
            Ok(*token)
        }
    };
    let host_rows = jobs
        .iter()
        .filter(|(seq, r)| matches!(r, Row::Logits(_)) && seq.samples_at_random())
        .count();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(host_rows / 2);
    if host_rows < PARALLEL_SAMPLING_ROWS || threads < 2 {
        return jobs.iter_mut().map(sample).collect();
    }
    let per = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks_mut(per)
            .map(|chunk| {
                let n = chunk.len();
                let handle = scope.spawn(move || chunk.iter_mut().map(sample).collect::<Vec<_>>());
                (n, handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| match h.join() {
                Ok(tokens) => tokens,
                // A panic in a sampler fails its chunk's sequences, not the engine thread.
                Err(_) => (0..n)
                    .map(|_| Err(Outcome::Failed("sampling panicked".to_string())))
                    .collect(),
            })
            .collect()
    })
}

/// KV cache bytes the running sequences reserve.
fn reserved(running: &[Sequence]) -> usize {
    running.iter().map(|s| s.kv_bytes).sum()
}

pub(crate) fn check_context(prompt: usize, max_tokens: usize, window: usize) -> Result<()> {
    if prompt.saturating_add(max_tokens) > window {
        return Err(EngineError::ContextWindowExceeded {
            prompt_tokens: prompt,
            max_tokens,
            context_window: window,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_without_a_valid_zero_are_refused_by_name() {
        assert!(SchedulerConfig::default().validate().is_ok());
        let cases = [
            (
                SchedulerConfig {
                    max_batch_size: 0,
                    ..SchedulerConfig::default()
                },
                "max_batch_size",
            ),
            (
                SchedulerConfig {
                    prefill_chunk: 0,
                    ..SchedulerConfig::default()
                },
                "prefill_chunk",
            ),
            (
                SchedulerConfig {
                    max_step_tokens: 0,
                    ..SchedulerConfig::default()
                },
                "max_step_tokens",
            ),
            (
                SchedulerConfig {
                    kv_cache_budget: Some(0),
                    ..SchedulerConfig::default()
                },
                "kv_cache_budget",
            ),
        ];
        for (config, name) in cases {
            let e = config.validate().unwrap_err();
            assert!(
                matches!(&e, EngineError::Config(m) if m.contains(name)),
                "{name}: {e}"
            );
        }
        // A queue of 0 is valid: no waiting, only batch slots.
        let no_queue = SchedulerConfig {
            max_queue: 0,
            ..SchedulerConfig::default()
        };
        assert!(no_queue.validate().is_ok());
    }
}
