//! The engine thread: continuous batching over per-sequence KV caches.

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::{LlamaModel, Segment};
use crate::sampling::Sampler;
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use edgerun_protocol::{SamplingParams, Usage};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Limits that shape the batch.
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

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-turn token.
    Stop,
    /// `max_tokens` reached, or the context window is full.
    Length,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The prompt has been read; the first token follows.
    PromptProcessed { prompt_tokens: usize },
    /// Text completed by the newest token (empty deltas are never sent).
    Token { text: String },
    /// The last event of a successful generation.
    Finished { usage: Usage, reason: FinishReason },
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
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
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

/// One running sequence.
struct Sequence {
    /// KV cache bytes this sequence reserved.
    kv_bytes: usize,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// The newest sampled token, fed to the model at the next step.
    pending: Option<u32>,
    generated: usize,
    max_tokens: usize,
    cache: KvCache,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    tx: UnboundedSender<GenerationEvent>,
}

impl Sequence {
    fn usage(&self) -> Usage {
        Usage::new(self.prompt.len() as u32, self.generated as u32)
    }
}

/// The loop that owns the model. Runs until every handle is dropped.
pub(crate) struct Scheduler {
    pub model: Arc<LlamaModel>,
    pub tokenizer: Arc<TextTokenizer>,
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
            .store(running.iter().map(|s| s.kv_bytes).sum(), Ordering::Relaxed);
    }

    fn kv_bytes_per_token(&self) -> usize {
        kv_bytes_per_token(self.model.config(), self.model.dtype())
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
                        let _ = seq.tx.send(GenerationEvent::Failed(
                            "internal error in the engine".into(),
                        ));
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
        running.retain(|s| !s.tx.is_closed());
        let cancelled = dropped_waiting + before - running.len();
        if cancelled > 0 {
            self.stats.cancelled.fetch_add(cancelled, Ordering::Relaxed);
            tracing::debug!(cancelled, "dropped cancelled sequences");
        }
    }

    fn admit(&self, waiting: &mut VecDeque<Submission>, running: &mut Vec<Sequence>) {
        while running.len() < self.config.max_batch_size {
            let Some(front) = waiting.front() else {
                break;
            };
            let cfg = self.model.config();
            let capacity =
                (front.prompt.len() + front.params.max_tokens as usize).min(cfg.context_length);
            let kv_bytes = capacity * self.kv_bytes_per_token();
            // First come, first served: the head of the queue waits for room rather than being
            // overtaken by smaller requests behind it.
            if let Some(budget) = self.config.kv_cache_budget {
                let reserved: usize = running.iter().map(|s| s.kv_bytes).sum();
                if !running.is_empty() && reserved + kv_bytes > budget {
                    break;
                }
            }
            let sub = waiting.pop_front().expect("the queue has a front");
            match KvCache::new(cfg, capacity, self.model.dtype(), self.model.device()) {
                Ok(cache) => running.push(Sequence {
                    kv_bytes,
                    sampler: Sampler::new(sub.params, &sub.prompt),
                    max_tokens: sub.params.max_tokens as usize,
                    prefilled: 0,
                    pending: None,
                    generated: 0,
                    decoder: IncrementalDecoder::new(),
                    cache,
                    prompt: sub.prompt,
                    tx: sub.tx,
                }),
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

    /// One forward pass over every running sequence, then sampling for those that need it.
    fn step(&self, running: &mut Vec<Sequence>) {
        // Decoding sequences first (one token each), then prompt chunks within the budget.
        let mut budget = self.config.max_step_tokens.max(1);
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq, start, len) into prompt; len 0 = decode
        for (i, s) in running.iter().enumerate() {
            if s.pending.is_some() {
                plan.push((i, 0, 0));
                budget = budget.saturating_sub(1);
            }
        }
        // Prompts are read in chunks at fixed boundaries (multiples of `prefill_chunk`), never
        // cut shorter to fit the step: the numerics of a chunk depend on its shape, so fixed
        // boundaries keep a sequence's output independent of what else is in the batch.
        let mut prefilling = false;
        for (i, s) in running.iter().enumerate() {
            let remaining = s.prompt.len() - s.prefilled;
            if s.pending.is_none() && remaining > 0 {
                let len = remaining.min(self.config.prefill_chunk.max(1));
                // At least one prompt chunk runs every step, whatever the decodes used of the
                // budget, so a long prompt is never starved by a steady stream of decodes.
                if len <= budget || !prefilling {
                    plan.push((i, s.prefilled, len));
                    budget = budget.saturating_sub(len);
                    prefilling = true;
                }
            }
        }
        plan.sort_unstable_by_key(|p| p.0);
        if plan.is_empty() {
            return;
        }

        self.stats
            .peak_batch
            .fetch_max(plan.len(), Ordering::Relaxed);
        let pending: Vec<[u32; 1]> = plan
            .iter()
            .map(|&(i, _, _)| [running[i].pending.unwrap_or(0)])
            .collect();
        // Which planned segments produce a token this step: decodes, and final prompt chunks.
        let sampling: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, &(i, start, len))| len == 0 || start + len == running[i].prompt.len())
            .map(|(k, _)| k)
            .collect();

        let result = {
            let mut by_index: Vec<Option<&mut Sequence>> = running.iter_mut().map(Some).collect();
            let mut segments: Vec<Segment<'_>> = Vec::with_capacity(plan.len());
            for (k, &(i, start, len)) in plan.iter().enumerate() {
                let seq = by_index[i].take().expect("each sequence planned once");
                let tokens: &[u32] = if len == 0 {
                    &pending[k]
                } else {
                    &seq.prompt[start..start + len]
                };
                segments.push(Segment {
                    tokens,
                    cache: &mut seq.cache,
                });
            }
            catch_unwind(AssertUnwindSafe(|| {
                self.model.forward(&mut segments, &sampling)
            }))
        };
        let logits = match result {
            Ok(Ok(logits)) => logits,
            Ok(Err(e)) => return self.fail_all(running, &plan, &e.to_string()),
            Err(_) => return self.fail_all(running, &plan, "the model panicked"),
        };
        for &(i, start, len) in &plan {
            if len > 0 {
                running[i].prefilled = start + len;
                if running[i].prefilled == running[i].prompt.len() {
                    let n = running[i].prompt.len();
                    self.stats.prompt_tokens.fetch_add(n, Ordering::Relaxed);
                    let _ = running[i]
                        .tx
                        .send(GenerationEvent::PromptProcessed { prompt_tokens: n });
                }
            }
        }
        let Some(logits) = logits else { return };
        let rows = match logits.to_vec2::<f32>() {
            Ok(r) => r,
            Err(e) => return self.fail_all(running, &plan, &e.to_string()),
        };
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        for (row, &k) in rows.into_iter().zip(&sampling) {
            let i = plan[k].0;
            if let Some(reason) = self.sample_one(&mut running[i], row) {
                finished.push((i, reason));
            }
        }
        // Remove finished sequences and update the counters before telling their clients, so
        // that anyone who has seen `Finished` also sees the sequence gone from the stats.
        finished.sort_unstable_by_key(|f| f.0);
        let done: Vec<(Sequence, FinishReason)> = finished
            .into_iter()
            .rev()
            .map(|(i, reason)| (running.swap_remove(i), reason))
            .collect();
        self.publish(running);
        self.stats
            .completed
            .fetch_add(done.len(), Ordering::Relaxed);
        for (seq, reason) in done {
            let _ = seq.tx.send(GenerationEvent::Finished {
                usage: seq.usage(),
                reason,
            });
        }
    }

    /// Samples the next token of `seq`; returns why it stops, if it does.
    fn sample_one(&self, seq: &mut Sequence, mut logits: Vec<f32>) -> Option<FinishReason> {
        let token = seq.sampler.sample(&mut logits);
        seq.sampler.observe(token);
        seq.generated += 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if self.tokenizer.stop_ids().contains(&token) {
            // The terminator is counted (it was generated) but not shown.
            self.flush(seq);
            return Some(FinishReason::Stop);
        }
        match seq.decoder.push(&self.tokenizer, token) {
            Ok(Some(text)) => {
                let _ = seq.tx.send(GenerationEvent::Token { text });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("detokenization failed: {e}"),
        }
        let context_full = seq.cache.len() + 1 >= self.model.config().context_length;
        if seq.generated >= seq.max_tokens || context_full {
            self.flush(seq);
            return Some(FinishReason::Length);
        }
        seq.pending = Some(token);
        None
    }

    fn flush(&self, seq: &mut Sequence) {
        if let Ok(Some(text)) = seq.decoder.flush(&self.tokenizer) {
            let _ = seq.tx.send(GenerationEvent::Token { text });
        }
    }

    fn fail_all(&self, running: &mut Vec<Sequence>, plan: &[(usize, usize, usize)], why: &str) {
        tracing::error!("step failed: {why}");
        let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
        idx.sort_unstable();
        idx.dedup();
        let failed: Vec<Sequence> = idx
            .into_iter()
            .rev()
            .map(|i| running.swap_remove(i))
            .collect();
        self.publish(running);
        for seq in failed {
            let _ = seq.tx.send(GenerationEvent::Failed(why.to_string()));
        }
    }
}

pub(crate) fn check_context(prompt: usize, max_tokens: usize, window: usize) -> Result<()> {
    if prompt + max_tokens > window {
        return Err(EngineError::ContextWindowExceeded {
            prompt_tokens: prompt,
            max_tokens,
            context_window: window,
        });
    }
    Ok(())
}

/// KV cache bytes one position takes for `cfg` in `dtype`.
pub fn kv_bytes_per_token(cfg: &crate::ModelConfig, dtype: candle_core::DType) -> usize {
    2 * cfg.block_count * cfg.head_count_kv * cfg.head_dim * dtype.size_in_bytes()
}
