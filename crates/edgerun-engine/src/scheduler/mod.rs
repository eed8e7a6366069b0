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

pub mod admission;
pub mod plan;

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::models::CausalLm;
use crate::request::{GenerationRequest, Usage};
use crate::sampling::Sampler;
use crate::sequence::{Sequence, SequenceParts, StopReason};
use crate::tokenizer::TextTokenizer;
use admission::KvReservation;
use candle_core::Tensor;
use plan::{plan_step, Planned, Work};
use std::collections::{BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_queue: 64,
            prefill_chunk: 128,
            max_step_tokens: 256,
            kv_cache_budget: None,
        }
    }
}

impl SchedulerConfig {
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
        Ok(())
    }
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The prompt has been read; the first token follows.
    PromptProcessed { prompt_tokens: usize },
    /// Text completed by the newest token (empty deltas are never sent).
    Token { text: String },
    /// The last event of a successful generation.
    Finished { usage: Usage, reason: StopReason },
    /// The last event of a failed generation.
    Failed(String),
}

/// The receiving end of one generation. Dropping it cancels the sequence: the engine notices
/// before its next step and frees the sequence's cache.
pub struct TokenStream {
    rx: UnboundedReceiver<GenerationEvent>,
}

impl TokenStream {
    pub async fn recv(&mut self) -> Option<GenerationEvent> {
        self.rx.recv().await
    }

    /// For callers outside an async runtime (tests, benchmarks).
    pub fn blocking_recv(&mut self) -> Option<GenerationEvent> {
        self.rx.blocking_recv()
    }
}

impl futures_core::Stream for TokenStream {
    type Item = GenerationEvent;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A request as the engine thread receives it.
pub(crate) struct Submission {
    pub request: GenerationRequest,
    pub reservation: KvReservation,
    pub tx: UnboundedSender<GenerationEvent>,
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
        }
    }
}

pub(crate) fn token_channel() -> (UnboundedSender<GenerationEvent>, TokenStream) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (tx, TokenStream { rx })
}

/// The loop that owns the model. Runs until every handle is dropped.
pub(crate) struct Scheduler {
    pub model: Arc<dyn CausalLm>,
    pub tokenizer: Arc<TextTokenizer>,
    pub stop_ids: Arc<BTreeSet<u32>>,
    pub config: SchedulerConfig,
    pub stats: Arc<EngineStats>,
    pub rx: mpsc::Receiver<Submission>,
}

impl Scheduler {
    /// Updates the shared counters that describe the running batch.
    fn publish(&self, running: &[Sequence]) {
        self.stats.active.store(running.len(), Ordering::Relaxed);
        self.stats
            .kv_reserved
            .store(reserved(running), Ordering::Relaxed);
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
        loop {
            if running.is_empty() && waiting.is_empty() {
                match self.rx.recv() {
                    Ok(s) => waiting.push_back(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                waiting.push_back(s);
            }
            self.drop_cancelled(&mut waiting, &mut running);
            self.admit(&mut waiting, &mut running);
            if !running.is_empty() {
                // A panic anywhere in a step (forward, sampling, detokenizing) fails that
                // step's sequences; the engine goes on serving the rest.
                if catch_unwind(AssertUnwindSafe(|| self.step(&mut running))).is_err() {
                    tracing::error!("a step panicked; failing its {} sequences", running.len());
                    for seq in running.drain(..) {
                        seq.fail("internal error in the engine");
                    }
                }
            }
            self.publish(&running);
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
        let cancelled = dropped_waiting + before - running.len();
        if cancelled > 0 {
            self.stats.cancelled.fetch_add(cancelled, Ordering::Relaxed);
            tracing::debug!(cancelled, "dropped cancelled sequences");
        }
    }

    fn admit(&self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
        let n = admission::startable(
            &self.config,
            running.len(),
            reserved(running),
            waiting.iter().map(|s| &s.reservation),
        );
        let layout = self.model.kv_layout();
        for sub in waiting.drain(..n) {
            match KvCache::new(&layout, sub.reservation.positions, self.model.device()) {
                Ok(cache) => running.push(Sequence::new(SequenceParts {
                    sampler: Sampler::new(sub.request.sampling, &sub.request.prompt),
                    prompt: sub.request.prompt,
                    stopping: sub.request.stopping,
                    stop_ids: self.stop_ids.clone(),
                    context_length: self.model.config().context_length,
                    kv_bytes: sub.reservation.bytes,
                    cache,
                    tx: sub.tx,
                })),
                Err(e) => {
                    let _ = sub.tx.send(GenerationEvent::Failed(format!(
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

    /// One step: plan, execute, update from the output.
    fn step(&self, running: &mut Vec<Sequence>) {
        let progress: Vec<_> = running.iter().map(Sequence::progress).collect();
        let plan = plan_step(&progress, &self.config);
        if plan.is_empty() {
            return;
        }
        // `execute`, `update_from_output` and `fail_planned` index by it.
        debug_assert!(plan.windows(2).all(|w| w[0].seq < w[1].seq));
        self.stats
            .peak_batch
            .fetch_max(plan.len(), Ordering::Relaxed);
        match self.execute(running, &plan) {
            Ok(logits) => self.update_from_output(running, &plan, logits),
            Err(why) => self.fail_planned(running, &plan, &why),
        }
    }

    /// Runs the model over the planned segments; returns the logits of the sampling entries,
    /// one row each, in plan order.
    fn execute(
        &self,
        running: &mut [Sequence],
        plan: &[Planned],
    ) -> std::result::Result<Vec<Vec<f32>>, String> {
        let want: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, p)| p.samples)
            .map(|(k, _)| k)
            .collect();
        // The plan is in sequence order with each sequence at most once, so the segments can
        // borrow the sequences one after the other.
        let mut segments = Vec::with_capacity(plan.len());
        let mut rest: &mut [Sequence] = running;
        let mut offset = 0;
        for p in plan {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(p.seq - offset);
            let (seq, tail) = tail.split_first_mut().expect("a planned sequence exists");
            segments.push(seq.segment(p.work));
            rest = tail;
            offset = p.seq + 1;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            self.model.forward(&mut segments, &want)
        }));
        let logits: Option<Tensor> = match result {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the model panicked".into()),
        };
        match logits {
            Some(t) => t.to_vec2::<f32>().map_err(|e| e.to_string()),
            None => Ok(Vec::new()),
        }
    }

    /// Advances prefills, samples a token for every sampling entry and retires the sequences
    /// that stop.
    fn update_from_output(
        &self,
        running: &mut Vec<Sequence>,
        plan: &[Planned],
        logits: Vec<Vec<f32>>,
    ) {
        for p in plan {
            if let Work::Prefill { start, len } = p.work {
                if let Some(n) = running[p.seq].prefilled(start, len) {
                    self.stats.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                    running[p.seq].emit(GenerationEvent::PromptProcessed { prompt_tokens: n });
                }
            }
        }
        let mut finished: Vec<(usize, StopReason)> = Vec::new();
        let sampling = plan.iter().filter(|p| p.samples);
        for (p, mut row) in sampling.zip(logits) {
            let seq = &mut running[p.seq];
            let token = seq.sample(&mut row);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if let Some(reason) = seq.accept(token, &self.tokenizer) {
                finished.push((p.seq, reason));
            }
        }
        // Remove finished sequences and update the counters before telling their clients, so
        // that anyone who has seen `Finished` also sees the sequence gone from the stats.
        let done: Vec<(Sequence, StopReason)> = finished
            .into_iter()
            .rev()
            .map(|(i, reason)| (running.swap_remove(i), reason))
            .collect();
        self.publish(running);
        self.stats
            .completed
            .fetch_add(done.len(), Ordering::Relaxed);
        for (seq, reason) in done {
            seq.finish(reason);
        }
    }

    /// Fails every sequence of a step that could not run.
    fn fail_planned(&self, running: &mut Vec<Sequence>, plan: &[Planned], why: &str) {
        tracing::error!("step failed: {why}");
        // The plan is in sequence order: remove from the back so indices stay valid.
        let failed: Vec<Sequence> = plan
            .iter()
            .rev()
            .map(|p| running.swap_remove(p.seq))
            .collect();
        self.publish(running);
        for seq in failed {
            seq.fail(why);
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
