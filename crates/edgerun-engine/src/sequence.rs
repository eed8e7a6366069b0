//! One running generation: its tokens, cache, sampler and detokenizer, and the rules that end
//! it.
//!
//! The scheduler decides *when* a sequence runs; the sequence decides what it feeds the model
//! ([`Sequence::segment`]), what a sampled token means ([`Sequence::accept`]) and whether it is
//! done. Each stop rule is a method here: the model's end-of-turn tokens
//! ([`Sequence::ends_turn`]), `max_tokens` and the end of the context window
//! ([`Sequence::out_of_room`]). Every piece of text passes through [`Sequence::release`] before
//! the caller sees it: that is where a text rule (stop strings: hold back a partial match, cut
//! at a full one, report [`StopReason`]) goes, with its parameter in [`StopCriteria`].

use crate::kv_cache::KvCache;
use crate::models::Segment;
use crate::request::{StopCriteria, Usage};
use crate::sampling::Sampler;
use crate::scheduler::plan::{SeqProgress, Work};
use crate::scheduler::GenerationEvent;
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::Sender;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced one of its end-of-turn tokens (counted, not shown).
    EndOfTurn,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The context window is full.
    ContextFull,
}

impl StopReason {
    /// Cut short by a length limit rather than ended by the model (OpenAI's `"length"` as
    /// opposed to `"stop"`).
    pub fn is_length(&self) -> bool {
        matches!(self, Self::MaxTokens | Self::ContextFull)
    }
}

/// Where the sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the prompt; this many tokens are in the cache.
    Prefill { done: usize },
    /// The prompt is read; the newest sampled token (`input`) is fed to the model next step.
    Decode,
}

/// A generation the scheduler is running.
pub(crate) struct Sequence {
    prompt: Vec<u32>,
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
    decoder: IncrementalDecoder,
    tx: Sender<GenerationEvent>,
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
    pub tx: Sender<GenerationEvent>,
}

impl Sequence {
    pub fn new(p: SequenceParts) -> Self {
        Self {
            prompt: p.prompt,
            phase: Phase::Prefill { done: 0 },
            input: [0],
            generated: 0,
            stopping: p.stopping,
            stop_ids: p.stop_ids,
            context_length: p.context_length,
            kv_bytes: p.kv_bytes,
            cache: p.cache,
            sampler: p.sampler,
            decoder: IncrementalDecoder::new(),
            tx: p.tx,
            blocked_since: None,
        }
    }

    /// Where it stands, for the planner.
    pub fn progress(&self) -> SeqProgress {
        let (prefilled, decoding) = match self.phase {
            Phase::Prefill { done } => (done, false),
            Phase::Decode => (self.prompt.len(), true),
        };
        SeqProgress {
            prompt_len: self.prompt.len(),
            prefilled,
            decoding,
            blocked: self.blocked_since.is_some(),
        }
    }

    /// Whether its channel has room for one step's events plus the reserved final error.
    fn has_room(&self) -> bool {
        self.tx.capacity() > crate::scheduler::EVENTS_PER_STEP
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

    /// Its share of a step doing `work`: the tokens to feed and the cache they extend.
    pub fn segment(&mut self, work: Work) -> Segment<'_> {
        let tokens: &[u32] = match work {
            Work::Decode => &self.input,
            Work::Prefill { start, len } => &self.prompt[start..start + len],
        };
        Segment {
            tokens,
            cache: &mut self.cache,
        }
    }

    /// Records that a prefill step ran; returns the prompt length once the whole prompt is in
    /// the cache.
    pub fn prefilled(&mut self, start: usize, len: usize) -> Option<usize> {
        self.phase = Phase::Prefill { done: start + len };
        (start + len == self.prompt.len()).then_some(self.prompt.len())
    }

    /// Chooses the next token from the model's logits.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.sampler.sample(logits)
    }

    /// Takes a sampled token: counts it, shows its text, and applies the stop rules. Returns
    /// why the sequence stops, if it does; otherwise the token is fed back next step.
    pub fn accept(&mut self, token: u32, tokenizer: &TextTokenizer) -> Option<StopReason> {
        self.sampler.observe(token);
        self.generated += 1;
        if self.ends_turn(token) {
            // The terminator is counted (it was generated) but not shown.
            self.flush(tokenizer);
            return Some(StopReason::EndOfTurn);
        }
        match self.decoder.push(tokenizer, token) {
            Ok(Some(text)) => self.release(text),
            Ok(None) => {}
            Err(e) => tracing::warn!("detokenization failed: {e}"),
        }
        if let Some(reason) = self.out_of_room() {
            self.flush(tokenizer);
            return Some(reason);
        }
        self.phase = Phase::Decode;
        self.input = [token];
        None
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

    /// Sends whatever text the detokenizer still holds.
    fn flush(&mut self, tokenizer: &TextTokenizer) {
        if let Ok(Some(text)) = self.decoder.flush(tokenizer) {
            self.release(text);
        }
    }

    /// The one way generated text reaches the caller. Text-based stop rules see it here first
    /// (none exist yet: every piece goes out as it is).
    fn release(&mut self, text: String) {
        self.emit(GenerationEvent::Token { text });
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated,
        }
    }

    /// Whoever asked for it is gone (its [`crate::TokenStream`] was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends an event to the caller; a caller that is gone is noticed before the next step.
    /// Never blocks: only sequences with room for a step's events are planned, and one slot is
    /// kept for the error that ends a stalled stream.
    pub fn emit(&self, event: GenerationEvent) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(event)) = self.tx.try_send(event) {
            tracing::error!(?event, "event channel full; event dropped");
        }
    }

    /// Ends the sequence successfully.
    pub fn finish(self, reason: StopReason) {
        let usage = self.usage();
        self.emit(GenerationEvent::Finished { usage, reason });
    }

    /// Ends the sequence with an error.
    pub fn fail(self, why: &str) {
        self.emit(GenerationEvent::Failed(why.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvLayout;
    use crate::request::SamplingConfig;
    use candle_core::{DType, Device};

    fn sequence(prompt_len: usize, max_tokens: usize, context_length: usize) -> Sequence {
        let layout = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        };
        let (tx, _rx) = crate::scheduler::token_channel();
        Sequence::new(SequenceParts {
            prompt: (0..prompt_len as u32).collect(),
            stopping: StopCriteria { max_tokens },
            stop_ids: Arc::new([7, 9].into_iter().collect()),
            context_length,
            kv_bytes: 0,
            cache: KvCache::new(&layout, context_length, &Device::Cpu).unwrap(),
            sampler: Sampler::new(SamplingConfig::GREEDY, &[]),
            tx,
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
        let seg = s.segment(Work::Prefill { start: 4, len: 3 });
        assert_eq!(seg.tokens, &[4, 5, 6]);
        assert_eq!(s.prefilled(0, 8), None);
        assert_eq!(s.progress().prefilled, 8);
        assert_eq!(s.prefilled(8, 2), Some(10));
        assert_eq!(s.usage().prompt_tokens, 10);
    }
}
