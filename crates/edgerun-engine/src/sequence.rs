//! One running generation: its tokens, cache, sampler and detokenizer, and the rules that end
//! it.
//!
//! The scheduler decides *when* a sequence runs; the sequence decides what it feeds the model
//! ([`Sequence::segment`]), what a sampled token means ([`Sequence::accept`]) and whether it is
//! done. Each stop rule is a method here: the model's end-of-turn tokens
//! ([`Sequence::ends_turn`]), `max_tokens` and the end of the context window
//! ([`Sequence::out_of_room`]), and the caller's stop strings ([`Sequence::release`]). Every
//! piece of text passes through [`Sequence::release`] before the caller sees it: text that could
//! be the start of a stop string is held back until the next text shows whether it is one; at
//! a full match the text is cut just before it, the rest (and whatever the detokenizer held) is
//! dropped, and the sequence ends with [`StopReason::StopString`]. The detokenizer releases only
//! whole characters, and held text is cut only at character boundaries, so no UTF-8 character
//! is ever split. What one [`Sequence::accept`] releases goes out as one `Token` event, with
//! the log-probabilities of the tokens generated since the last one (when asked for:
//! [`Sequence::sample`] computes them from the raw logits).

use crate::constraint::{Constraint, Grammar};
use crate::kv_cache::KvCache;
use crate::models::Segment;
use crate::request::{LogprobEntry, Logprobs, StopCriteria, TokenLogprob, Usage};
use crate::sampling::{step_logprobs, Sampler, StepLogprobs};
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
    /// The text reached one of the caller's stop strings (not shown).
    StopString,
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
    decoder: IncrementalDecoder,
    /// Released text that could be the start of a stop string (only with stop strings).
    held: String,
    /// Text to send at the end of the current [`Sequence::accept`].
    out: String,
    /// Log-probabilities of the newest sampled token, by id (only when asked for).
    sampled: Option<StepLogprobs>,
    /// Log-probabilities of the tokens not yet sent.
    logprobs: Vec<TokenLogprob>,
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
    pub constraint: Constraint,
    pub tx: Sender<GenerationEvent>,
    pub order: u64,
}

impl Sequence {
    pub fn new(p: SequenceParts) -> Self {
        Self {
            context: p.prompt.clone(),
            prompt: p.prompt,
            announced: false,
            order: p.order,
            phase: Phase::Prefill { done: 0 },
            input: [0],
            generated: 0,
            stopping: p.stopping,
            stop_ids: p.stop_ids,
            context_length: p.context_length,
            kv_bytes: p.kv_bytes,
            cache: p.cache,
            sampler: p.sampler,
            constraint: p.constraint,
            decoder: IncrementalDecoder::new(),
            held: String::new(),
            out: String::new(),
            sampled: None,
            logprobs: Vec::new(),
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

    /// Takes the blocks to read its whole context again and sample the next token; `false`
    /// (nothing taken) when the pool is short.
    pub fn reserve_to_resume(&mut self) -> bool {
        self.cache.grow_to(self.positions_to_resume())
    }

    /// Gives its cache back (`empty` takes its place) and starts reading its context again:
    /// when that is done it samples the token it would have sampled next, as if nothing had
    /// happened (the sampler, the grammar, the text sent are untouched).
    pub fn preempt(&mut self, empty: KvCache) {
        self.cache = empty;
        self.phase = Phase::Prefill { done: 0 };
    }

    /// Whether its next token may be sampled where the logits are ([`crate::DeviceSampler`]):
    /// no output format to mask by and no log-probabilities to report. Then the step takes
    /// [`Sequence::device_row`] and hands the token to [`Sequence::accept`] directly.
    pub fn device_samplable(&self) -> bool {
        matches!(self.constraint, Constraint::Free) && self.sampler.logprobs() == Logprobs::Off
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

    /// Takes a sampled token: counts it, shows its text, and applies the stop rules. Returns
    /// why the sequence stops, if it does; otherwise the token is fed back next step. Fails
    /// when its output format rejects the token (which the mask should make impossible).
    pub fn accept(
        &mut self,
        token: u32,
        tokenizer: &TextTokenizer,
    ) -> Result<Option<StopReason>, String> {
        self.sampler.observe(token);
        self.generated += 1;
        let sampled = self.sampled.take();
        if !self.ends_turn(token) {
            if let Some(grammar) = self.constraint.grammar() {
                grammar.consume(token)?;
            }
        }
        let reason = if self.ends_turn(token) {
            // The terminator is counted (it was generated) but neither shown nor reported.
            Some(self.flush(tokenizer).unwrap_or(StopReason::EndOfTurn))
        } else {
            if let Some(step) = sampled {
                self.logprobs.push(resolve(step, tokenizer));
            }
            let mut reason = match self.decoder.push(tokenizer, token) {
                Ok(Some(text)) => self.release(&text),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!("detokenization failed: {e}");
                    None
                }
            };
            if reason.is_none() && self.format_complete() {
                reason = Some(self.flush(tokenizer).unwrap_or(StopReason::EndOfTurn));
            }
            if reason.is_none() {
                if let Some(limit) = self.out_of_room() {
                    reason = Some(self.flush(tokenizer).unwrap_or(limit));
                }
            }
            reason
        };
        self.send();
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

    /// The generation ends: releases whatever the detokenizer still holds, then the text held
    /// for a stop string (it was not one). A stop string completed by the detokenizer's last
    /// text still counts: then that is why it stopped.
    fn flush(&mut self, tokenizer: &TextTokenizer) -> Option<StopReason> {
        if let Ok(Some(text)) = self.decoder.flush(tokenizer) {
            if let Some(reason) = self.release(&text) {
                return Some(reason);
            }
        }
        let held = std::mem::take(&mut self.held);
        self.out.push_str(&held);
        None
    }

    /// The one way generated text reaches the caller (at the end of the step, [`Self::send`]).
    /// Stop rule: the caller's stop strings. Text that could be the start of one is held back;
    /// at a full match (the earliest, if several) the text before it goes out and the rest is
    /// dropped.
    fn release(&mut self, text: &str) -> Option<StopReason> {
        if self.stopping.stop.is_empty() {
            self.out.push_str(text);
            return None;
        }
        self.held.push_str(text);
        let stops = &self.stopping.stop;
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.out.push_str(&self.held[..at]);
            self.held.clear();
            return Some(StopReason::StopString);
        }
        let cut = self.held.len() - partial_stop_len(&self.held, stops);
        self.out.push_str(&self.held[..cut]);
        self.held.drain(..cut);
        None
    }

    /// Sends what this step released, if anything: one `Token` event.
    fn send(&mut self) {
        if self.out.is_empty() && self.logprobs.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.out);
        let logprobs = std::mem::take(&mut self.logprobs);
        self.emit(GenerationEvent::Token { text, logprobs });
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

    /// Ends the sequence successfully. Its cache is freed first (paged blocks back in the
    /// pool), so whoever sees the last event sees the memory free.
    pub fn finish(self, reason: StopReason) {
        let usage = self.usage();
        let tx = self.into_sender();
        Self::send_last(&tx, GenerationEvent::Finished { usage, reason });
    }

    /// Ends the sequence with an error (its cache freed first, as in [`Sequence::finish`]).
    pub fn fail(self, why: &str) {
        let tx = self.into_sender();
        Self::send_last(&tx, GenerationEvent::Failed(why.to_string()));
    }

    /// Drops everything but the event channel.
    fn into_sender(self) -> Sender<GenerationEvent> {
        self.tx
    }

    fn send_last(tx: &Sender<GenerationEvent>, event: GenerationEvent) {
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(event)) = tx.try_send(event) {
            tracing::error!(?event, "event channel full; event dropped");
        }
    }
}

/// The length of the longest end of `text` that is the start (but not the whole) of one of
/// `stops`, cut at a character boundary: the text that must be held back.
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest.saturating_sub(1));
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| i >= from)
        .find(|&i| {
            let tail = &text[i..];
            stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
        })
        .map_or(0, |i| text.len() - i)
}

/// A step's log-probabilities with each token's bytes.
fn resolve(step: StepLogprobs, tokenizer: &TextTokenizer) -> TokenLogprob {
    let entry = |(id, logprob): (u32, f32)| LogprobEntry {
        id,
        bytes: tokenizer.token_bytes(id),
        logprob,
    };
    TokenLogprob {
        chosen: entry(step.chosen),
        top: step.top.into_iter().map(entry).collect(),
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
        let (tx, _rx) = crate::scheduler::token_channel();
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

    /// Feeds `pieces` of text through the stop rule, one per step; what went out after each
    /// step, and the stop reason if one ended it.
    fn steps(stop: &[&str], pieces: &[&str]) -> (Vec<String>, Option<StopReason>) {
        let mut s = with_stops(1, 100, 100, stop);
        let mut sent = Vec::new();
        for piece in pieces {
            let reason = s.release(piece);
            sent.push(std::mem::take(&mut s.out));
            if reason.is_some() {
                return (sent, reason);
            }
        }
        // The end of the generation releases what was held.
        let held = std::mem::take(&mut s.held);
        s.out.push_str(&held);
        sent.push(std::mem::take(&mut s.out));
        (sent, None)
    }

    #[test]
    fn without_stop_strings_text_goes_out_as_it_comes() {
        let (sent, reason) = steps(&[], &["Hel", "lo", " wor", "ld"]);
        assert_eq!(sent, ["Hel", "lo", " wor", "ld", ""]);
        assert_eq!(reason, None);
    }

    #[test]
    fn a_partial_match_is_held_until_it_is_decided() {
        // "EN" could start "END": held; "D" completes it: cut before it, stop.
        let (sent, reason) = steps(&["END"], &["one E", "N", "D two"]);
        assert_eq!(sent, ["one ", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        // "EN" then "X": not a stop string after all, released whole.
        let (sent, reason) = steps(&["END"], &["one E", "N", "X two"]);
        assert_eq!(sent, ["one ", "", "ENX two", ""]);
        assert_eq!(reason, None);
        // A match inside one piece; the text after it is dropped.
        let (sent, reason) = steps(&["\n\n"], &["a\n\nb"]);
        assert_eq!(sent, ["a"]);
        assert_eq!(reason, Some(StopReason::StopString));
        // Held text that never completes goes out at the end.
        let (sent, reason) = steps(&["END"], &["x E"]);
        assert_eq!(sent, ["x ", "E"]);
        assert_eq!(reason, None);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (sent, reason) = steps(&["cd", "bcX", "b"], &["a", "bc", "d"]);
        // "b" alone is a full match at once.
        assert_eq!(sent, ["a", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        let (sent, _) = steps(&["xyz", "yq"], &["ax", "yq"]);
        // "xy" was held for "xyz"; "yq" matches first at position 1 of "xyq".
        assert_eq!(sent, ["a", "x"]);
        // The longest possible start is held: "abab" with stop "abac".
        let (sent, _) = steps(&["abac"], &["abab", "ac"]);
        assert_eq!(sent, ["ab", ""]);
    }

    #[test]
    fn held_text_is_never_cut_inside_a_character() {
        // The stop string starts with the first byte of "é" and of "è" (C3 A9 / C3 A8): a
        // held end is whole characters, so "é" is not held for "è!".
        let (sent, reason) = steps(&["è!"], &["café", "è", "!"]);
        assert_eq!(sent, ["café", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        let (sent, _) = steps(&["🦀🦀"], &["a🦀", "b🦀", "🦀c"]);
        assert_eq!(sent, ["a", "🦀b", ""]);
        for pieces in [&["日本", "語x"][..], &["日", "本語", "x"]] {
            let (sent, reason) = steps(&["本語"], pieces);
            assert_eq!(sent.concat(), "日");
            assert_eq!(reason, Some(StopReason::StopString));
            assert!(sent
                .iter()
                .all(|s| std::str::from_utf8(s.as_bytes()).is_ok()));
        }
    }

    #[test]
    fn partial_stop_len_is_the_longest_start_held() {
        let stops = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(partial_stop_len("hello wo", &stops(&["world"])), 2);
        assert_eq!(partial_stop_len("hello", &stops(&["world"])), 0);
        // A full match is not "partial" (release finds it first).
        assert_eq!(partial_stop_len("world", &stops(&["world"])), 0);
        assert_eq!(partial_stop_len("aa", &stops(&["aaa", "b"])), 2);
        assert_eq!(partial_stop_len("", &stops(&["x"])), 0);
        assert_eq!(partial_stop_len("é", &stops(&["éa"])), 2);
    }

    #[test]
    fn a_step_sends_one_event_with_its_text_and_logprobs() {
        let (tx, mut rx) = crate::scheduler::token_channel();
        let mut s = with_stops(1, 100, 100, &["STOP"]);
        s.tx = tx;
        assert_eq!(s.release("abc ST"), None);
        let lp = TokenLogprob {
            chosen: LogprobEntry {
                id: 1,
                bytes: b"x".to_vec(),
                logprob: -0.5,
            },
            top: Vec::new(),
        };
        s.logprobs.push(lp.clone());
        s.send();
        assert_eq!(
            rx.blocking_recv(),
            Some(GenerationEvent::Token {
                text: "abc ".into(),
                logprobs: vec![lp.clone()],
            })
        );
        // Nothing released but a token's logprobs: sent with empty text.
        assert_eq!(s.release("O"), None);
        s.logprobs.push(lp.clone());
        s.send();
        assert_eq!(
            rx.blocking_recv(),
            Some(GenerationEvent::Token {
                text: String::new(),
                logprobs: vec![lp],
            })
        );
        // Neither: nothing sent.
        s.send();
        assert_eq!(s.release("P"), Some(StopReason::StopString));
        s.send();
        drop(s);
        assert_eq!(rx.blocking_recv(), None);
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
                completion_tokens: 2
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
