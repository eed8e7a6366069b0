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
//! With [`crate::KvStorage::Paged`] a sequence is admitted with the blocks for its prompt and
//! first token ([`admission::startable_paged`] keeps a block of headroom per running sequence) and
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
//!
//! ## Tracing
//!
//! With `EDGERUN_LOG=edgerun=debug` (the server's filter) the loop tells where a request's
//! time went, per step and never per token:
//!
//! - `admitted` (event): a request left the queue; `seq` (its admission number, the id every
//!   later record of it carries), `prompt_tokens`, `queued_us` (from submission to admission);
//! - `step` (span): one step, from after planning to retiring; `kind` (`prefill`, `decode` or
//!   `mixed`), `batch` (sequences in it), `tokens` (fed to the model). Inside it a `prefill
//!   chunk` event per prompt chunk (`seq`, `start`, `len`), the `forward` span (the model's
//!   pass, device sampling and the copy back; the rest of the step is host work), `prompt
//!   read` when a sequence's prompt is done (`seq`, `prompt_tokens`) and `left the batch`
//!   (`seq`, `outcome`) for each sequence that ends.
//!
//! A subscriber that shows span closes (`FmtSpan::CLOSE`) prints each step's and each forward
//! pass's duration. When the level is off the spans are disabled at their call sites (one
//! check per step) and their fields are never computed.
//!
//! ## Where the parts live
//!
//! | part | file |
//! |---|---|
//! | the loop: submissions, cancelling, admission, preemption, retiring, faults | `mod.rs` |
//! | the settings and their validation ([`SchedulerConfig`]) | `config.rs` |
//! | counters, snapshot, health ([`EngineStats`], [`StatsSnapshot`], [`Health`]) | `stats.rs` |
//! | the model runner: forward pass, rows, device and host sampling | `runner.rs` |
//! | which sequences are admitted, how a step is composed (pure) | `admission.rs`, `plan.rs` |

pub mod admission;
mod config;
pub mod plan;
mod runner;
mod stats;

pub use config::SchedulerConfig;
pub use stats::{EngineStats, Health, StatsSnapshot, FAILING_AFTER};

use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvPool};
use crate::models::CausalLm;
use crate::output::{Emitted, Outbox};
use crate::request::{GenerationRequest, StopReason};
use crate::sampling::Sampler;
use crate::sequence::{Ending, Sequence, SequenceParts};
use admission::KvReservation;
use plan::{plan_step, Planned, Work};
use runner::{sample_rows, Row, Runner, StepError};
use std::collections::{BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

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

/// A request as the engine thread receives it.
pub(crate) struct Submission {
    pub request: GenerationRequest,
    pub reservation: KvReservation,
    pub tx: Outbox,
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

impl Outcome {
    /// What the `left the batch` trace event calls it.
    fn name(&self) -> &'static str {
        match self {
            Self::Finished(_) => "finished",
            Self::Failed(_) => "failed",
            Self::FormatUnmet(_) => "format_unmet",
            Self::Stalled => "stalled",
        }
    }
}

impl From<StepError> for Outcome {
    fn from(e: StepError) -> Self {
        match e {
            StepError::FormatUnmet(why) => Self::FormatUnmet(why),
            e => Self::Failed(e.to_string()),
        }
    }
}

/// What the engine thread is started with ([`crate::Engine::start`]); [`Scheduler::run`]
/// turns it into the loop. Runs until every handle is dropped.
pub(crate) struct Scheduler {
    pub model: Arc<dyn CausalLm>,
    pub stop_ids: Arc<BTreeSet<u32>>,
    pub config: SchedulerConfig,
    pub stats: Arc<EngineStats>,
    pub rx: mpsc::Receiver<Submission>,
    /// The paged pool every cache is taken from, when [`SchedulerConfig::kv_storage`] is paged.
    pub pool: Option<KvPool>,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<std::sync::Mutex<crate::faults::Faults>>,
}

impl Scheduler {
    /// Runs the loop on this thread until every handle is dropped.
    pub fn run(self) {
        let device_sampling = self.pool.is_some() && self.config.device_sampling;
        Loop {
            runner: Runner {
                model: self.model,
                stats: self.stats.clone(),
                device_sampling,
                device_sampler: None,
                #[cfg(feature = "fault-injection")]
                faults: self.faults,
            },
            stop_ids: self.stop_ids,
            config: self.config,
            stats: self.stats,
            rx: self.rx,
            pool: self.pool,
            next_order: 0,
            preempted: Vec::new(),
        }
        .run()
    }
}

/// The loop's state, owned by the engine thread.
struct Loop {
    runner: Runner,
    stop_ids: Arc<BTreeSet<u32>>,
    config: SchedulerConfig,
    stats: Arc<EngineStats>,
    rx: mpsc::Receiver<Submission>,
    pool: Option<KvPool>,
    /// The next admission's order number.
    next_order: u64,
    /// Preempted sequences (oldest first), holding no blocks, waiting for room to read their
    /// context again; they go back into the batch before anything new is admitted.
    preempted: Vec<Sequence>,
}

impl Loop {
    /// Updates the shared counters that describe the running batch.
    fn publish(&self, running: &[Sequence]) {
        let preempted = self.preempted.len();
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

    fn run(mut self) {
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
            if running.is_empty() && waiting.is_empty() && self.preempted.is_empty() {
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
                        match self.runner.probe() {
                            Ok(()) => {
                                tracing::info!("the device passed a probe step; healthy again");
                                self.stats.step_succeeded();
                            }
                            Err(e) => self.stats.device_failed(&e.to_string()),
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
    fn end_by_readers(&mut self, running: &mut Vec<Sequence>) {
        let ended: Vec<_> = (0..running.len())
            .filter(|&i| running[i].ended_by_reader())
            .map(|i| (i, Outcome::Finished(StopReason::StopString)))
            .collect();
        self.retire(running, ended);
        let (ended, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.preempted)
            .into_iter()
            .partition(Sequence::ended_by_reader);
        self.preempted = waiting;
        if !ended.is_empty() {
            self.publish(running);
        }
        for seq in ended {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
            seq.finish(StopReason::StopString);
        }
    }

    fn drop_cancelled(&mut self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
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
        let preempted = &mut self.preempted;
        let before_preempted = preempted.len();
        preempted.retain(|s| !s.is_cancelled());
        let cancelled =
            dropped_waiting + before - running.len() + before_preempted - preempted.len();
        if cancelled > 0 {
            self.stats.cancelled.fetch_add(cancelled, Ordering::Relaxed);
            tracing::debug!(cancelled, "dropped cancelled sequences");
        }
    }

    fn admit(&mut self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
        // First come, first served: nothing new while a preempted one waits.
        if self.pool.is_some() && !self.resume_preempted(running) {
            return;
        }
        let n = match &self.pool {
            None => admission::startable(
                &self.config,
                running.len(),
                reserved(running),
                waiting.iter().map(|s| &s.reservation),
            ),
            Some(pool) => admission::startable_paged(
                &self.config,
                running.len(),
                pool.available(),
                waiting
                    .iter()
                    .map(|s| pool.blocks_for(s.request.prompt.len() + 1)),
            ),
        };
        let layout = self.runner.model.kv_layout();
        for sub in waiting.drain(..n) {
            let cache = match &self.pool {
                // Its prompt and first token now, starting from the blocks the pool caches of
                // its prompt; more blocks as it grows. Admission counted them all as needed
                // (reused ones take no more): this only fails on a bug.
                Some(pool) => pool.cache_for(&sub.request.prompt, sub.request.prompt.len() + 1),
                None => KvCache::new(
                    &layout,
                    sub.reservation.positions,
                    self.runner.model.device(),
                ),
            };
            let order = self.next_order;
            self.next_order += 1;
            tracing::debug!(
                seq = order,
                prompt_tokens = sub.request.prompt.len(),
                queued_us = micros(sub.tx.opened().elapsed()),
                "admitted"
            );
            match cache {
                Ok(cache) => running.push(Sequence::new(SequenceParts {
                    sampler: Sampler::new(sub.request.sampling, &sub.request.prompt),
                    prompt: sub.request.prompt,
                    stopping: sub.request.stopping,
                    constraint: sub.request.constraint,
                    stop_ids: self.stop_ids.clone(),
                    context_length: self.runner.model.config().context_length,
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
    fn resume_preempted(&mut self, running: &mut Vec<Sequence>) -> bool {
        let Some(pool) = &self.pool else {
            return true;
        };
        let preempted = &mut self.preempted;
        while let Some(seq) = preempted.first_mut() {
            let need = pool.blocks_for(seq.positions_to_resume());
            if running.len() >= self.config.max_batch_size
                || pool.available() < need + running.len()
                || !seq.reserve_to_resume(pool)
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
    fn preempt_newest(&mut self, running: &mut Vec<Sequence>) -> bool {
        let Some(pool) = &self.pool else {
            return false;
        };
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
        let at = self.preempted.partition_point(|s| s.order < seq.order);
        self.preempted.insert(at, seq);
        true
    }

    /// The step's plan, with (paged) the blocks every planned sequence needs taken, oldest
    /// first, preempting the newest sequences until they fit.
    fn plan(&mut self, running: &mut Vec<Sequence>) -> Vec<Planned> {
        loop {
            let progress: Vec<_> = running.iter().map(Sequence::progress).collect();
            let plan = plan_step(&progress, &self.config);
            if self.pool.is_none() {
                return plan;
            }
            let mut by_age: Vec<&Planned> = plan.iter().collect();
            by_age.sort_by_key(|p| running[p.seq].order);
            if by_age.into_iter().all(|p| running[p.seq].grow_for(p.work)) {
                return plan;
            }
            if !self.preempt_newest(running) {
                return Vec::new();
            }
            self.publish(running);
        }
    }

    /// One step: plan, execute, update from the output. `false` when nothing could be planned
    /// (every running sequence waits for its client).
    fn step(&mut self, running: &mut Vec<Sequence>) -> bool {
        let start = std::time::Instant::now();
        let plan = self.plan(running);
        if plan.is_empty() {
            return false;
        }
        let span = tracing::debug_span!(
            "step",
            kind = tracing::field::Empty,
            batch = plan.len(),
            tokens = tracing::field::Empty,
        );
        let _entered = span.enter();
        if !span.is_disabled() {
            describe_step(&span, running, &plan);
        }
        // `execute` and `update_from_output` index by it.
        debug_assert!(plan.windows(2).all(|w| w[0].seq < w[1].seq));
        self.stats
            .peak_batch
            .fetch_max(plan.len(), Ordering::Relaxed);
        let mut outcomes = Vec::new();
        let forward_start = std::time::Instant::now();
        let executed = self.runner.execute(running, &plan);
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
            if let Some((free, total)) = crate::device_memory(self.runner.model.device()) {
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
        &mut self,
        running: &mut [Sequence],
        plan: &[Planned],
        why: StepError,
        outcomes: &mut Vec<(usize, Outcome)>,
    ) {
        let mut ran = Vec::new();
        let mut logits = Vec::new();
        if plan.len() == 1 {
            outcomes.push((plan[0].seq, Outcome::Failed(why.to_string())));
        } else {
            tracing::warn!(
                sequences = plan.len(),
                error = %why,
                "a step failed; retrying each of its sequences alone"
            );
            for p in plan {
                match self.runner.execute(running, std::slice::from_ref(p)) {
                    Ok(rows) => {
                        ran.push(*p);
                        logits.extend(rows);
                    }
                    Err(e) => outcomes.push((p.seq, Outcome::Failed(e.to_string()))),
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
        } else if let Err(e) = self.runner.probe() {
            tracing::error!(error = %e, "the device failed a probe step");
            self.stats.device_failed(&e.to_string());
        } else {
            // The device works: the sequences themselves could not run.
            self.stats.step_succeeded();
        }
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
                let seq = &mut running[p.seq];
                if let Some(n) = seq.prefilled(start, len) {
                    let cached = seq.cached_tokens();
                    tracing::debug!(seq = seq.order, prompt_tokens = n, cached, "prompt read");
                    self.stats.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                    self.stats
                        .prompt_tokens_cached
                        .fetch_add(cached, Ordering::Relaxed);
                    seq.emit(Emitted::PromptProcessed {
                        prompt_tokens: n,
                        cached_tokens: cached,
                    });
                }
            }
            // What the step wrote is in the cache: blocks it filled can serve later prompts.
            running[p.seq].share_full_blocks();
        }
        let sampling: Vec<&Planned> = plan.iter().filter(|p| p.samples).collect();
        let sampled = sample_rows(running, &sampling, logits);
        for (p, sampled) in sampling.into_iter().zip(sampled) {
            let seq = &mut running[p.seq];
            let accepted = sampled.map_err(Outcome::from).and_then(|token| {
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
        // Every ended sequence's memory goes back before any of their clients hears of it:
        // whoever sees one `Finished` sees the stats, and the pool, without all of them.
        let endings: Vec<Ending> = gone
            .into_iter()
            .map(|(seq, outcome)| {
                tracing::debug!(seq = seq.order, outcome = outcome.name(), "left the batch");
                match outcome {
                    Outcome::Finished(reason) => {
                        self.stats.completed.fetch_add(1, Ordering::Relaxed);
                        seq.finishing(reason)
                    }
                    Outcome::Failed(why) => {
                        self.stats.failed_sequences.fetch_add(1, Ordering::Relaxed);
                        seq.failing(&why)
                    }
                    // The caller's format: neither a failure of the engine nor a completion.
                    Outcome::FormatUnmet(why) => seq.format_unmet(&why),
                    Outcome::Stalled => {
                        self.stats.stalled.fetch_add(1, Ordering::Relaxed);
                        let secs = self.config.stalled_stream_timeout.as_secs_f32();
                        seq.stall(&format!(
                            "the client did not read the stream for {secs:.0} s; generation stopped"
                        ))
                    }
                }
            })
            .collect();
        self.publish(running);
        for ending in endings {
            ending.send();
        }
    }
}

/// Microseconds in `d`, for trace fields.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Fills in the step span's fields and notes each prefill chunk in it; called only when the
/// span is enabled (see the module docs).
fn describe_step(span: &tracing::Span, running: &[Sequence], plan: &[Planned]) {
    let (mut prefills, mut decodes, mut tokens) = (0, 0, 0);
    for p in plan {
        match p.work {
            Work::Decode => {
                decodes += 1;
                tokens += 1;
            }
            Work::Prefill { len, .. } => {
                prefills += 1;
                tokens += len;
            }
        }
    }
    let kind = match (prefills, decodes) {
        (0, _) => "decode",
        (_, 0) => "prefill",
        _ => "mixed",
    };
    // Recorded before the chunk events, so that they carry the step's fields.
    span.record("kind", kind);
    span.record("tokens", tokens);
    for p in plan {
        if let Work::Prefill { start, len } = p.work {
            tracing::debug!(seq = running[p.seq].order, start, len, "prefill chunk");
        }
    }
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
