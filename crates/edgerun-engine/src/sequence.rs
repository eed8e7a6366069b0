//! One running generation: its tokens, cache and sampler, and the rules that end it.
//!
//! The scheduler decides *when* a sequence runs; the sequence decides what it feeds the model
//! ([`Sequence::segment`]), what a sampled token means ([`Sequence::accept`]) and whether it is
//! done. Each stop rule on ids is a method here: the model's end-of-turn tokens
//! ([`Sequence::ends_turn`]), a complete output format ([`Sequence::format_complete`]),
//! `max_tokens` and the end of the context window ([`Sequence::out_of_room`]). The sequence
//! sends its reader ids, never text: each sampled token (but an end-of-turn one) goes out as
//! one `Token` event with its log-probabilities when asked for ([`Sequence::sample`] computes
//! them from the raw logits), and the reader's [`crate::TokenStream`] detokenizes and applies
//! the caller's stop strings (`output.rs`); a stop string it finds ends the sequence through
//! [`Sequence::ended_by_reader`].

use crate::constraint::{Constraint, Grammar};
use crate::kv_cache::KvCache;
use crate::models::Segment;
use crate::output::{Emitted, Outbox};
use crate::request::{Logprobs, StopCriteria, StopReason, Usage};
use crate::sampling::{step_logprobs, Sampler, StepLogprobs};
use crate::scheduler::plan::{SeqProgress, Work};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading its context (the prompt; after a preemption, the prompt and every token
    /// generated so far); this many tokens are in the cache.
    Prefill { done: usize },
    /// The prompt is read; the newest sampled token (`input`) is fed to the model next step.
    Decode,
}

/// A generation the scheduler is running.
pub(crate) struct Sequence {
    prompt: Vec<u32>,
    /// What the cache holds, or will once read: the prompt, then each generated token that the
    /// sequence goes on from (the newest is the pending decode input). A preempted sequence
    /// reads it all again.
    context: Vec<u32>,
    /// Its prompt has been read once (announced with `PromptProcessed`, counted): reading its
    /// context again after a preemption announces nothing.
    announced: bool,
    /// Prompt tokens whose keys and values came from the pool's prefix cache at admission.
    cached_tokens: usize,
    /// Admission order (older first): preemption takes the newest.
    pub(crate) order: u64,
    phase: Phase,
    /// The decode input: `[last]`, kept here so a step can borrow it next to the cache.
    input: [u32; 1],
    generated: usize,
    stopping: StopCriteria,
    /// The model's end-of-turn tokens (shared by every sequence).
    stop_ids: Arc<BTreeSet<u32>>,
    context_length: usize,
    /// KV cache bytes this sequence reserved.
    pub(crate) kv_bytes: usize,
    cache: KvCache,
    sampler: Sampler,
    /// The output format's grammar, if any: masks each step's logits, ends the sequence when
    /// complete.
    constraint: Constraint,
    /// Log-probabilities of the newest sampled token, by id (only when asked for).
    sampled: Option<StepLogprobs>,
    tx: Outbox,
    /// Since when its client has not made room for a step's events.
    blocked_since: Option<Instant>,
}

/// Everything a sequence is made of.
pub(crate) struct SequenceParts {
    pub prompt: Vec<u32>,
    pub stopping: StopCriteria,
    pub stop_ids: Arc<BTreeSet<u32>>,
    pub context_length: usize,
    pub kv_bytes: usize,
    pub cache: KvCache,
    pub sampler: Sampler,
    pub constraint: Constraint,
    pub tx: Outbox,
    pub order: u64,
}

impl Sequence {
    /// A sequence whose cache may already hold the first positions of its prompt (a prefix
    /// cache hit, [`crate::KvPool::cache_for`]): it reads the rest.
    pub fn new(p: SequenceParts) -> Self {
        let cached = p.cache.len();
        Self {
            context: p.prompt.clone(),
            prompt: p.prompt,
            announced: false,
            cached_tokens: cached,
            order: p.order,
            phase: Phase::Prefill { done: cached },
            input: [0],
            generated: 0,
            stopping: p.stopping,
            stop_ids: p.stop_ids,
            context_length: p.context_length,
            kv_bytes: p.kv_bytes,
            cache: p.cache,
            sampler: p.sampler,
            constraint: p.constraint,
            sampled: None,
            tx: p.tx,
            blocked_since: None,
        }
    }

    /// Where it stands, for the planner.
    pub fn progress(&self) -> SeqProgress {
        let (prefilled, decoding) = match self.phase {
            Phase::Prefill { done } => (done, false),
            Phase::Decode => (self.context.len(), true),
        };
        SeqProgress {
            prompt_len: self.context.len(),
            prefilled,
            decoding,
            blocked: self.blocked_since.is_some(),
        }
    }

    /// Whether its channel has room for one step's events plus the reserved final error.
    fn has_room(&self) -> bool {
        self.tx.capacity() > crate::output::EVENTS_PER_STEP
    }

    /// How long its client has left no room for a step's events (zero when there is room).
    /// Updates the blocked state the planner sees.
    pub fn stalled_for(&mut self, now: Instant) -> Duration {
        if self.has_room() {
            self.blocked_since = None;
            Duration::ZERO
        } else {
            now - *self.blocked_since.get_or_insert(now)
        }
    }

    /// Its share of a step doing `work`: the tokens to feed and the cache they extend, and its
    /// grammar (when it has one) to compute the next mask while the model runs.
    pub fn segment(&mut self, work: Work) -> (Segment<'_>, Option<&mut Grammar>) {
        let tokens: &[u32] = match work {
            Work::Decode => &self.input,
            Work::Prefill { start, len } => &self.context[start..start + len],
        };
        let segment = Segment {
            tokens,
            cache: &mut self.cache,
        };
        (segment, self.constraint.grammar())
    }

    /// Records that a prefill step ran; returns the prompt length once the whole prompt is in
    /// the cache for the first time (not when a preempted sequence has read it again).
    pub fn prefilled(&mut self, start: usize, len: usize) -> Option<usize> {
        self.phase = Phase::Prefill { done: start + len };
        if start + len < self.context.len() {
            return None;
        }
        (!std::mem::replace(&mut self.announced, true)).then_some(self.prompt.len())
    }

    /// Makes room in a paged cache for what `work` feeds; `false` when the pool is short.
    pub fn grow_for(&mut self, work: Work) -> bool {
        let t = match work {
            Work::Decode => 1,
            Work::Prefill { len, .. } => len,
        };
        self.cache.grow_to(self.cache.len() + t)
    }

    /// Blocks of the pool it holds.
    pub fn blocks_held(&self) -> usize {
        self.cache.blocks_held()
    }

    /// Positions it needs to go on after a preemption: its whole context and the next token.
    pub fn positions_to_resume(&self) -> usize {
        self.context.len() + 1
    }

    /// Takes the blocks to read its whole context again and sample the next token, starting
    /// from what the pool still caches of it; `false` (nothing taken) when the pool is short.
    pub fn reserve_to_resume(&mut self, pool: &crate::KvPool) -> bool {
        match pool.cache_for(&self.context, self.positions_to_resume()) {
            Ok(cache) => {
                self.phase = Phase::Prefill { done: cache.len() };
                self.cache = cache;
                true
            }
            Err(_) => false,
        }
    }

    /// After a step: publishes the cache's blocks that filled, for later prompts to reuse.
    pub fn share_full_blocks(&mut self) {
        self.cache.share_full_blocks(&self.context);
    }

    /// Prompt tokens that came from the prefix cache at admission.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Gives its cache back (`empty` takes its place) and starts reading its context again:
    /// when that is done it samples the token it would have sampled next, as if nothing had
    /// happened (the sampler, the grammar, the text sent are untouched).
    pub fn preempt(&mut self, empty: KvCache) {
        self.cache = empty;
        self.phase = Phase::Prefill { done: 0 };
    }

    /// Whether its next token may be sampled where the logits are ([`crate::DeviceSampler`]):
    /// no output format to mask by. Then the step takes [`Sequence::device_row`], hands the
    /// token's log-probabilities (when reported, computed there too) to
    /// [`Sequence::sampled_on_device`] and the token to [`Sequence::accept`].
    pub fn device_samplable(&self) -> bool {
        matches!(self.constraint, Constraint::Free)
    }

    /// The log-probabilities of a token sampled on the device, as [`Sequence::sample`] notes
    /// them for one sampled here.
    pub fn sampled_on_device(&mut self, logprobs: Option<StepLogprobs>) {
        self.sampled = logprobs;
    }

    /// Its next token's sampling, resolved for [`crate::DeviceSampler`] (the uniform drawn
    /// from its generator; a row handed back is finished by [`Sequence::sample`] with it).
    pub fn device_row(&mut self) -> crate::DeviceRow {
        self.sampler.device_row()
    }

    /// Whether its sampling draws at random (temperature above 0): the costly kind.
    pub fn samples_at_random(&self) -> bool {
        !self.sampler.is_greedy()
    }

    /// Chooses the next token from the model's logits, among those its output format allows,
    /// noting its log-probabilities when they are to be reported (from the logits as the model
    /// gave them, before the format's mask and any penalty). Fails when the format's mask
    /// could not be computed.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32, String> {
        let raw = match self.sampler.logprobs() {
            Logprobs::Off => None,
            Logprobs::Report { top } => Some((logits.to_vec(), top)),
        };
        if let Some(grammar) = self.constraint.grammar() {
            grammar.apply(logits)?;
        }
        let token = self.sampler.sample(logits);
        if let Some((raw, top)) = raw {
            self.sampled = Some(step_logprobs(&raw, token, top));
        }
        Ok(token)
    }

    /// Takes a sampled token: counts it, sends it to the reader, and applies the stop rules
    /// on ids. Returns why the sequence stops, if it does; otherwise the token is fed back next
    /// step. Fails when its output format rejects the token (which the mask should make
    /// impossible).
    pub fn accept(&mut self, token: u32) -> Result<Option<StopReason>, String> {
        self.sampler.observe(token);
        self.generated += 1;
        let logprobs = self.sampled.take();
        if self.ends_turn(token) {
            // The terminator is counted (it was generated) but neither shown nor reported.
            return Ok(Some(StopReason::EndOfTurn));
        }
        if let Some(grammar) = self.constraint.grammar() {
            grammar.consume(token)?;
        }
        self.emit(Emitted::Token {
            id: token,
            logprobs,
        });
        let reason = if self.format_complete() {
            Some(StopReason::EndOfTurn)
        } else {
            self.out_of_room()
        };
        if reason.is_none() {
            self.phase = Phase::Decode;
            self.input = [token];
            self.context.push(token);
        }
        Ok(reason)
    }

    /// Stop rule: the output format's grammar is complete (only an end-of-turn token could
    /// follow, so none is sampled: it ends like one).
    fn format_complete(&mut self) -> bool {
        self.constraint.grammar().is_some_and(|g| g.is_complete())
    }

    /// Stop rule: the model's end-of-turn tokens.
    fn ends_turn(&self, token: u32) -> bool {
        self.stop_ids.contains(&token)
    }

    /// Stop rule: `max_tokens` generated, or no room left in the context for the next token.
    fn out_of_room(&self) -> Option<StopReason> {
        if self.generated >= self.stopping.max_tokens {
            Some(StopReason::MaxTokens)
        } else if self.cache.len() + 1 >= self.context_length {
            Some(StopReason::ContextFull)
        } else {
            None
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated,
            cached_tokens: self.cached_tokens,
        }
    }

    /// Stop rule: its reader found one of the caller's stop strings in the text (see
    /// `output.rs`); it ends with [`StopReason::StopString`], before anything else is checked.
    pub fn ended_by_reader(&self) -> bool {
        self.tx.reader_ended()
    }

    /// Whoever asked for it is gone (its [`crate::TokenStream`] was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends an event to the caller; a caller that is gone is noticed before the next step.
    /// Never blocks: only sequences with room for a step's events are planned, and one slot is
    /// kept for the error that ends a stalled stream.
    pub fn emit(&self, event: Emitted) {
        self.tx.send(event);
    }

    /// Ends the sequence successfully. Its cache is freed first (paged blocks back in the
    /// pool), so whoever sees the last event sees the memory free.
    pub fn finish(self, reason: StopReason) {
        self.finishing(reason).send();
    }

    /// [`Sequence::finish`] in two halves: the cache freed now, the last event sent by
    /// [`Ending::send`], so that a step that ends several sequences frees all their memory
    /// before any client hears of it (a load report read by one sees the others gone too).
    pub fn finishing(self, reason: StopReason) -> Ending {
        let usage = self.usage();
        Ending::new(self.into_outbox(), Emitted::Finished { usage, reason })
    }

    /// Ends the sequence with an error (its cache freed first, as in [`Sequence::finish`]).
    pub fn fail(self, why: &str) {
        self.failing(why).send();
    }

    /// [`Sequence::fail`] in two halves (see [`Sequence::finishing`]).
    pub fn failing(self, why: &str) -> Ending {
        Ending::new(self.into_outbox(), Emitted::Failed(why.to_string()))
    }

    /// Ends the sequence because its output format could not be followed (the caller's
    /// format, not an engine failure; its cache freed first), in two halves (see
    /// [`Sequence::finishing`]).
    pub fn format_unmet(self, why: &str) -> Ending {
        Ending::new(self.into_outbox(), Emitted::FormatUnmet(why.to_string()))
    }

    /// Ends the sequence because its client stopped reading (its cache freed first): the
    /// reader finds the error after whatever it had not read, and [`crate::SequenceEnd`] says
    /// why. In two halves (see [`Sequence::finishing`]).
    pub fn stall(self, why: &str) -> Ending {
        let mut ending = Ending::new(self.into_outbox(), Emitted::Failed(why.to_string()));
        ending.stalled = true;
        ending
    }

    /// Drops everything but the event channel.
    fn into_outbox(self) -> Outbox {
        self.tx
    }
}

/// A sequence that has ended: its cache freed, its last event not yet sent.
pub struct Ending {
    outbox: Outbox,
    event: Emitted,
    stalled: bool,
}

impl Ending {
    fn new(outbox: Outbox, event: Emitted) -> Self {
        Self {
            outbox,
            event,
            stalled: false,
        }
    }

    /// Sends the last event.
    pub fn send(self) {
        if self.stalled {
            self.outbox.mark_stalled();
        }
        self.outbox.send(self.event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvLayout;
    use crate::request::SamplingConfig;
    use candle_core::{DType, Device};

    fn sequence(prompt_len: usize, max_tokens: usize, context_length: usize) -> Sequence {
        with_stops(prompt_len, max_tokens, context_length, &[])
    }

    fn with_stops(
        prompt_len: usize,
        max_tokens: usize,
        context_length: usize,
        stop: &[&str],
    ) -> Sequence {
        let layout = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        };
        let (tx, _rx) = crate::output::channel(
            Arc::new(crate::tokenizer::bytes_only()),
            stop.iter().map(|s| s.to_string()).collect(),
        );
        Sequence::new(SequenceParts {
            prompt: (0..prompt_len as u32).collect(),
            stopping: StopCriteria {
                max_tokens,
                stop: stop.iter().map(|s| s.to_string()).collect(),
            },
            stop_ids: Arc::new([7, 9].into_iter().collect()),
            context_length,
            kv_bytes: 0,
            cache: KvCache::new(&layout, context_length, &Device::Cpu).unwrap(),
            sampler: Sampler::new(SamplingConfig::GREEDY, &[]),
            constraint: Constraint::Free,
            tx,
            order: 0,
        })
    }

    #[test]
    fn the_end_of_turn_rule_is_the_models_terminators() {
        let s = sequence(3, 10, 100);
        assert!(s.ends_turn(7) && s.ends_turn(9));
        assert!(!s.ends_turn(8));
    }

    #[test]
    fn the_length_rules_are_max_tokens_then_the_context() {
        let mut s = sequence(3, 2, 100);
        assert_eq!(s.out_of_room(), None);
        s.generated = 2;
        assert_eq!(s.out_of_room(), Some(StopReason::MaxTokens));
        assert!(StopReason::MaxTokens.is_length() && !StopReason::EndOfTurn.is_length());
        // No room for another position: the context is full, whatever max_tokens allows.
        let mut s = sequence(3, 50, 4);
        s.cache.commit(3);
        assert_eq!(s.out_of_room(), Some(StopReason::ContextFull));
    }

    #[test]
    fn progress_and_segments_follow_the_phase() {
        let mut s = sequence(10, 5, 100);
        assert_eq!(
            s.progress(),
            SeqProgress {
                prompt_len: 10,
                prefilled: 0,
                decoding: false,
                blocked: false,
            }
        );
        let (seg, grammar) = s.segment(Work::Prefill { start: 4, len: 3 });
        assert!(grammar.is_none());
        assert_eq!(seg.tokens, &[4, 5, 6]);
        assert_eq!(s.prefilled(0, 8), None);
        assert_eq!(s.progress().prefilled, 8);
        assert_eq!(s.prefilled(8, 2), Some(10));
        assert_eq!(s.usage().prompt_tokens, 10);
    }

    /// A preempted sequence reads its prompt and what it generated again, announces nothing,
    /// and then samples on as before.
    #[test]
    fn a_preempted_sequence_reads_its_whole_context_again() {
        let mut s = sequence(4, 10, 100);
        assert_eq!(s.prefilled(0, 4), Some(4));
        // As `accept` leaves it after two tokens: the cache holds the prompt and 20, and 21
        // waits to be fed.
        s.cache.commit(5);
        s.context.extend([20, 21]);
        s.generated = 2;
        s.input = [21];
        s.phase = Phase::Decode;
        assert!(s.progress().decoding);
        let layout = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            dtype: DType::F32,
        };
        let pool = crate::KvPool::new(&layout, 4, 4, &Device::Cpu).unwrap();
        s.preempt(pool.empty_cache());
        assert_eq!(s.positions_to_resume(), 7);
        assert_eq!(
            s.progress(),
            SeqProgress {
                prompt_len: 6,
                prefilled: 0,
                decoding: false,
                blocked: false,
            }
        );
        assert!(s.grow_for(Work::Prefill { start: 0, len: 6 }));
        assert_eq!(s.blocks_held(), 2);
        let (seg, _) = s.segment(Work::Prefill { start: 2, len: 4 });
        assert_eq!(seg.tokens, &[2, 3, 20, 21]);
        assert_eq!(s.prefilled(0, 3), None);
        assert_eq!(s.prefilled(3, 3), None, "the prompt is not announced twice");
        assert_eq!(
            s.usage(),
            Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                cached_tokens: 0,
            }
        );

        // Preempted before its prompt was read: announced when it is, once.
        let mut s = sequence(4, 10, 100);
        assert_eq!(s.prefilled(0, 2), None);
        s.preempt(pool.empty_cache());
        assert_eq!(s.progress().prefilled, 0);
        assert_eq!(s.prefilled(0, 4), Some(4));
    }
}
