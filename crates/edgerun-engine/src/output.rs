//! The text stage: a generation's token ids become text on the reader's side of its channel.
//!
//! The engine thread sends each sequence's sampled ids ([`Emitted`]) and nothing else; the
//! [`TokenStream`] that reads them detokenizes, applies the caller's stop strings and gives
//! log-probabilities their tokens' bytes, on whichever thread reads it (a server's tokio task,
//! one per stream). On a GPU the engine thread thus goes straight back to launching the next
//! step while the CPU turns the last one into text, and the text work of many streams spreads
//! over the runtime's threads instead of queueing on one (vLLM's V1 engine splits the same
//! way: the engine core returns ids, the front end detokenizes and checks stop strings).
//!
//! ## What the engine still decides
//!
//! Every rule that depends on ids alone stays on the engine thread (`Sequence::accept`): the
//! model's end-of-turn tokens (never sent: counted, not shown), a complete output format,
//! `max_tokens` and the context. The stream flushes its text when the engine's `Finished`
//! arrives, so that event is always the last, after all the text.
//!
//! Whether the engine still holds a sequence can be asked without reading its stream
//! ([`TokenStream::end`], a [`SequenceEnd`]): a server whose client stopped reading cannot read
//! the stream either, and leaves it to the engine to end a stalled sequence (with a `Failed`
//! event the reader finds after the text it had not read, and [`SequenceEnd::stalled`] set)
//! rather than closing the connection under it.
//!
//! ## Stop strings
//!
//! Stop strings are a rule on text, so they live here ([`StopStrings::release`]). Text that
//! could be the start of a stop string is held back until the next text shows whether it is
//! one; at a full match the text is cut just before it, the rest (and whatever the
//! detokenizer held) is dropped. The detokenizer releases only whole characters, and held
//! text is cut only at character boundaries, so no UTF-8 character is ever split.
//!
//! At a match the stream sends the text before it at once and raises the sequence's
//! [`Outbox::reader_ended`] flag, which the engine reads before each step as it notices a
//! dropped stream: it retires the sequence as finished (`StopReason::StopString`), frees its
//! cache, counts it, and sends `Finished`. The stream drops every token that arrives after
//! the match and holds its own `Finished` until the engine's end arrives, so whoever sees
//! `Finished` sees the sequence's memory free and the counters updated, as for every other
//! end. Its usage counts the tokens up to and including the one that completed the match:
//! the engine may have computed one more (more when the reader is slow, at most a channel's
//! worth) that is neither shown nor billed.

mod stop;

use crate::request::{LogprobEntry, StopReason, TokenLogprob, Usage};
use crate::sampling::StepLogprobs;
use crate::tokenizer::{IncrementalDecoder, TextTokenizer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use stop::StopStrings;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender};

/// Events one sequence's channel holds before its client counts as not reading.
pub const EVENT_BUFFER: usize = 64;
/// Events one step can send a sequence: prompt processed, the new token, and its end (one
/// spare). A sequence is planned only with room for these plus one, kept for the error that
/// ends a stalled stream.
pub(crate) const EVENTS_PER_STEP: usize = 4;

/// What the engine thread sends one sequence's reader.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Emitted {
    /// The prompt has been read (the first time only); `cached_tokens` of it came from the
    /// prefix cache.
    PromptProcessed {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// A generated token to show (never an end-of-turn token), with its log-probabilities
    /// when they are reported.
    Token {
        id: u32,
        logprobs: Option<StepLogprobs>,
    },
    /// The engine ended the sequence: its usage and why.
    Finished {
        usage: Usage,
        reason: StopReason,
    },
    Failed(String),
    FormatUnmet(String),
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// The prompt has been read; the first token follows.
    PromptProcessed { prompt_tokens: usize },
    /// Text completed by the newest token(s), and, when [`crate::Logprobs::Report`] was asked
    /// for, the log-probabilities of the tokens generated since the last such event (the
    /// end-of-turn token excepted). `text` may be empty only when `logprobs` is not (text held
    /// back by a stop string's partial match, or a token that ends inside a character);
    /// events with neither are never sent.
    Token {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The last event of a successful generation.
    Finished { usage: Usage, reason: StopReason },
    /// The last event of a failed generation.
    Failed(String),
    /// The last event of a generation whose output format could not be followed further: the
    /// caller's format (a schema no finite output satisfies, or a step over the grammar
    /// engine's limits), not an engine failure. The message says why, without parser state.
    FormatUnmet(String),
}

/// The engine's end of one sequence's channel.
pub(crate) struct Outbox {
    tx: Sender<Emitted>,
    /// Raised by the reader when a stop string ended the text (see the module docs).
    ended: Arc<AtomicBool>,
    /// How the engine is done with the sequence, for [`SequenceEnd`]: set when this end of the
    /// channel goes, whatever the reason.
    end: Arc<AtomicU8>,
    /// When the request was submitted (the channel opens then): its queue wait is measured
    /// from here.
    opened: Instant,
}

const RUNNING: u8 = 0;
const RETIRED: u8 = 1;
const STALLED: u8 = 2;

impl Drop for Outbox {
    /// The engine is done with the sequence (finished, failed, cancelled, dropped for
    /// stalling, or the engine stopped): whatever its reader has not read yet is all there is.
    fn drop(&mut self) {
        let _ = self
            .end
            .compare_exchange(RUNNING, RETIRED, Ordering::Release, Ordering::Relaxed);
    }
}

impl Outbox {
    /// When the request was submitted.
    pub fn opened(&self) -> Instant {
        self.opened
    }

    /// Sends an event; never blocks. The scheduler plans only sequences with room for a
    /// step's events, so a full channel is a bug, logged; a closed one is noticed before the
    /// next step.
    pub fn send(&self, event: Emitted) {
        if let Err(TrySendError::Full(event)) = self.tx.try_send(event) {
            tracing::error!(?event, "event channel full; event dropped");
        }
    }

    /// Its reader is gone (the [`TokenStream`] was dropped).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Its reader found a stop string: the sequence is done (it may also have been dropped
    /// since; it still counts as finished).
    pub fn reader_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Free places in the channel.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The sequence is being dropped because its reader stopped reading (before its last
    /// event is sent, so a reader that gets that event sees [`SequenceEnd::stalled`]).
    pub fn mark_stalled(&self) {
        self.end.store(STALLED, Ordering::Release);
    }
}

/// Whether, and how, the engine is done with a sequence, readable without reading its
/// stream: a server whose client stopped reading cannot read the stream either, yet must know
/// whether the engine still holds the sequence (it will end a stalled one, with an error event
/// for the reader, after its stalled-stream timeout) or has let it go. A clone of
/// [`TokenStream::end`].
#[derive(Debug, Clone)]
pub struct SequenceEnd(Arc<AtomicU8>);

impl SequenceEnd {
    /// The engine holds nothing of the sequence any more: its events, the last one included,
    /// are all in the channel (or it was cancelled).
    pub fn is_retired(&self) -> bool {
        self.0.load(Ordering::Acquire) != RUNNING
    }

    /// The engine dropped the sequence because its reader left no room for its events for
    /// the stalled-stream timeout; its last event is the `Failed` saying so.
    pub fn stalled(&self) -> bool {
        self.0.load(Ordering::Acquire) == STALLED
    }
}

/// A new sequence's channel: the engine's end and the caller's stream, which turns ids into
/// text with `tokenizer` and ends at the first of `stops`.
pub(crate) fn channel(tokenizer: Arc<TextTokenizer>, stops: Vec<String>) -> (Outbox, TokenStream) {
    let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
    let ended = Arc::new(AtomicBool::new(false));
    let end = Arc::new(AtomicU8::new(RUNNING));
    let stream = TokenStream {
        rx,
        text: TextStage {
            tokenizer,
            decoder: IncrementalDecoder::new(),
            stops: StopStrings::new(stops),
            out: String::new(),
            logprobs: Vec::new(),
            shown: 0,
        },
        prompt_tokens: 0,
        cached_tokens: 0,
        ended: ended.clone(),
        end: SequenceEnd(end.clone()),
        ready: VecDeque::new(),
        state: State::Reading,
    };
    let outbox = Outbox {
        tx,
        ended,
        end,
        opened: Instant::now(),
    };
    (outbox, stream)
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    /// A stop string ended the text; waiting for the engine to retire the sequence.
    Stopped,
    /// Its last event is out.
    Done,
}

/// The receiving end of one generation. Dropping it cancels the sequence: the engine notices
/// before its next step and frees the sequence's cache. It buffers at most [`EVENT_BUFFER`]
/// events: a reader that falls that far behind pauses its sequence (see the scheduler's
/// docs). Reading it does the text work (see the module docs): a few microseconds per token.
pub struct TokenStream {
    rx: Receiver<Emitted>,
    text: TextStage,
    /// Prompt tokens, and those of them from the prefix cache, as the engine announced them.
    prompt_tokens: usize,
    cached_tokens: usize,
    ended: Arc<AtomicBool>,
    end: SequenceEnd,
    /// Events made from what was received, not yet handed out.
    ready: VecDeque<GenerationEvent>,
    state: State,
}

impl TokenStream {
    /// How the engine is done with this sequence, as a handle that outlives `&self` borrows
    /// (see [`SequenceEnd`]).
    pub fn end(&self) -> SequenceEnd {
        self.end.clone()
    }

    pub async fn recv(&mut self) -> Option<GenerationEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// For callers outside an async runtime (tests, benchmarks).
    pub fn blocking_recv(&mut self) -> Option<GenerationEvent> {
        loop {
            if let Some(event) = self.next_ready() {
                return event;
            }
            let received = self.rx.blocking_recv();
            self.take(received);
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        loop {
            if let Some(event) = self.next_ready() {
                return Poll::Ready(event);
            }
            let received = ready!(self.rx.poll_recv(cx));
            self.take(received);
        }
    }

    /// The next event to hand out, `Some(None)` once the last is out, `None` when more must be
    /// received first.
    fn next_ready(&mut self) -> Option<Option<GenerationEvent>> {
        match self.ready.pop_front() {
            Some(event) => Some(Some(event)),
            None if self.state == State::Done => Some(None),
            None => None,
        }
    }

    /// Turns what the engine sent (`None`: the engine's end of the channel is gone) into the
    /// caller's events.
    fn take(&mut self, received: Option<Emitted>) {
        match (self.state, received) {
            (State::Done, _) => {}
            (
                State::Reading,
                Some(Emitted::PromptProcessed {
                    prompt_tokens,
                    cached_tokens,
                }),
            ) => {
                self.prompt_tokens = prompt_tokens;
                self.cached_tokens = cached_tokens;
                self.ready
                    .push_back(GenerationEvent::PromptProcessed { prompt_tokens });
            }
            (State::Reading, Some(Emitted::Token { id, logprobs })) => {
                let stopped = self.text.token(id, logprobs);
                self.ready.extend(self.text.event());
                if stopped {
                    self.ended.store(true, Ordering::Relaxed);
                    self.state = State::Stopped;
                }
            }
            (State::Reading, Some(Emitted::Finished { usage, reason })) => {
                let flushed = self.text.flush();
                self.ready.extend(self.text.event());
                let reason = flushed.unwrap_or(reason);
                self.ready
                    .push_back(GenerationEvent::Finished { usage, reason });
                self.state = State::Done;
            }
            (State::Reading, Some(Emitted::Failed(why))) => {
                self.ready.push_back(GenerationEvent::Failed(why));
                self.state = State::Done;
            }
            (State::Reading, Some(Emitted::FormatUnmet(why))) => {
                self.ready.push_back(GenerationEvent::FormatUnmet(why));
                self.state = State::Done;
            }
            (State::Reading, None) => self.state = State::Done,
            // After a stop string: what the engine computed past it is dropped; its end (or
            // its failure, or its channel closing: the text is complete either way) lets the
            // stream finish.
            (State::Stopped, Some(Emitted::Token { .. } | Emitted::PromptProcessed { .. })) => {}
            (
                State::Stopped,
                Some(Emitted::Finished { .. } | Emitted::Failed(_) | Emitted::FormatUnmet(_))
                | None,
            ) => {
                let usage = Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.text.shown,
                    cached_tokens: self.cached_tokens,
                };
                self.ready.push_back(GenerationEvent::Finished {
                    usage,
                    reason: StopReason::StopString,
                });
                self.state = State::Done;
            }
        }
    }
}

impl futures_core::Stream for TokenStream {
    type Item = GenerationEvent;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.poll_event(cx)
    }
}

/// One stream's text: the detokenizer, the stop strings, and what the newest tokens released.
struct TextStage {
    tokenizer: Arc<TextTokenizer>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    /// Text released by the tokens taken since the last event.
    out: String,
    /// Log-probabilities of the tokens taken since the last event.
    logprobs: Vec<TokenLogprob>,
    /// Tokens taken.
    shown: usize,
}

impl TextStage {
    /// Takes a generated token; `true` when it completed a stop string.
    fn token(&mut self, id: u32, logprobs: Option<StepLogprobs>) -> bool {
        self.shown += 1;
        if let Some(step) = logprobs {
            self.logprobs.push(resolve(step, &self.tokenizer));
        }
        match self.decoder.push(&self.tokenizer, id) {
            Ok(Some(text)) => self.stops.release(&text, &mut self.out).is_some(),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("detokenization failed: {e}");
                false
            }
        }
    }

    /// The generation ends: releases whatever the detokenizer still holds, then the text held
    /// for a stop string (it was not one). A stop string completed by the detokenizer's last
    /// text still counts: then that is why it stopped.
    fn flush(&mut self) -> Option<StopReason> {
        if let Ok(Some(text)) = self.decoder.flush(&self.tokenizer) {
            if let Some(reason) = self.stops.release(&text, &mut self.out) {
                return Some(reason);
            }
        }
        self.stops.flush(&mut self.out);
        None
    }

    /// What the tokens taken since the last event released, if anything: one `Token` event.
    fn event(&mut self) -> Option<GenerationEvent> {
        if self.out.is_empty() && self.logprobs.is_empty() {
            return None;
        }
        Some(GenerationEvent::Token {
            text: std::mem::take(&mut self.out),
            logprobs: std::mem::take(&mut self.logprobs),
        })
    }
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

    /// A stream over the byte tokenizer (id = byte) ending at `stops`, and its engine end.
    fn stream(stops: &[&str]) -> (Outbox, TokenStream) {
        let stops = stops.iter().map(|s| s.to_string()).collect();
        channel(Arc::new(crate::tokenizer::bytes_only()), stops)
    }

    fn send_text(outbox: &Outbox, text: &str) {
        for &b in text.as_bytes() {
            outbox.send(Emitted::Token {
                id: b.into(),
                logprobs: None,
            });
        }
    }

    fn token(text: &str) -> GenerationEvent {
        GenerationEvent::Token {
            text: text.into(),
            logprobs: Vec::new(),
        }
    }

    fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        }
    }

    /// Everything the stream hands out until its end.
    fn drain(stream: &mut TokenStream) -> Vec<GenerationEvent> {
        std::iter::from_fn(|| stream.blocking_recv()).collect()
    }

    #[test]
    fn the_stream_turns_ids_into_text_and_the_engines_end_comes_last() {
        let (outbox, mut s) = stream(&[]);
        outbox.send(Emitted::PromptProcessed {
            prompt_tokens: 3,
            cached_tokens: 0,
        });
        // "é" is two bytes: the first alone releases nothing (no event at all).
        send_text(&outbox, "hé!");
        outbox.send(Emitted::Finished {
            usage: usage(3, 5),
            reason: StopReason::EndOfTurn,
        });
        drop(outbox);
        assert_eq!(
            drain(&mut s),
            [
                GenerationEvent::PromptProcessed { prompt_tokens: 3 },
                token("h"),
                token("é"),
                token("!"),
                GenerationEvent::Finished {
                    usage: usage(3, 5),
                    reason: StopReason::EndOfTurn
                },
            ]
        );
        assert_eq!(s.blocking_recv(), None);
    }

    #[test]
    fn a_token_with_logprobs_and_no_text_yet_is_an_event_with_empty_text() {
        let (outbox, mut s) = stream(&[]);
        let [lead, tail]: [u8; 2] = "é".as_bytes().try_into().unwrap();
        for b in [lead, tail] {
            outbox.send(Emitted::Token {
                id: b.into(),
                logprobs: Some(StepLogprobs {
                    chosen: (b.into(), -0.5),
                    top: vec![(b.into(), -0.5)],
                }),
            });
        }
        let entry = |b: u8| LogprobEntry {
            id: b.into(),
            bytes: vec![b],
            logprob: -0.5,
        };
        let lp = |b: u8| TokenLogprob {
            chosen: entry(b),
            top: vec![entry(b)],
        };
        let events = [s.blocking_recv(), s.blocking_recv()];
        assert_eq!(
            events,
            [
                Some(GenerationEvent::Token {
                    text: String::new(),
                    logprobs: vec![lp(lead)]
                }),
                Some(GenerationEvent::Token {
                    text: "é".into(),
                    logprobs: vec![lp(tail)]
                }),
            ]
        );
    }

    /// Text held for a possible stop string still sends the token's log-probabilities (with
    /// empty text); a token with neither sends nothing.
    #[test]
    fn held_text_still_sends_logprobs_and_an_empty_step_sends_nothing() {
        let (outbox, mut s) = stream(&["STOP"]);
        send_text(&outbox, "abc ST");
        let lp = StepLogprobs {
            chosen: (u32::from(b'O'), -0.5),
            top: Vec::new(),
        };
        outbox.send(Emitted::Token {
            id: b'O'.into(),
            logprobs: Some(lp),
        });
        outbox.send(Emitted::Token {
            id: b'P'.into(),
            logprobs: None,
        });
        outbox.send(Emitted::Finished {
            usage: usage(1, 9),
            reason: StopReason::MaxTokens,
        });
        let o = LogprobEntry {
            id: b'O'.into(),
            bytes: b"O".to_vec(),
            logprob: -0.5,
        };
        assert_eq!(
            drain(&mut s),
            [
                token("a"),
                token("b"),
                token("c"),
                token(" "),
                // "S" and "T" are held and carry no log-probabilities: no event at all.
                GenerationEvent::Token {
                    text: String::new(),
                    logprobs: vec![TokenLogprob {
                        chosen: o,
                        top: Vec::new()
                    }],
                },
                GenerationEvent::Finished {
                    usage: usage(0, 8),
                    reason: StopReason::StopString
                },
            ]
        );
        assert_eq!(s.blocking_recv(), None);
    }

    /// At a stop string the stream sends the text before it, tells the engine, drops what the
    /// engine computed past it, and finishes only once the engine has retired the sequence,
    /// with the tokens up to the match as its usage.
    #[test]
    fn a_stop_string_ends_the_text_and_waits_for_the_engine() {
        let (outbox, mut s) = stream(&["END"]);
        outbox.send(Emitted::PromptProcessed {
            prompt_tokens: 2,
            cached_tokens: 0,
        });
        send_text(&outbox, "ab ENDx");
        assert_eq!(
            s.blocking_recv(),
            Some(GenerationEvent::PromptProcessed { prompt_tokens: 2 })
        );
        for expected in ["a", "b", " "] {
            assert_eq!(s.blocking_recv(), Some(token(expected)));
        }
        assert!(!outbox.reader_ended());
        // "E", "N" are held, "D" completes the match; "x" came after it. Nothing is handed out
        // until the engine ends the sequence.
        let waiting = std::thread::spawn(move || drain(&mut s));
        let started = std::time::Instant::now();
        while !outbox.reader_ended() {
            assert!(started.elapsed().as_secs() < 10, "the engine is told");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiting.is_finished(), "Finished waits for the engine");
        outbox.send(Emitted::Finished {
            usage: usage(2, 9),
            reason: StopReason::MaxTokens,
        });
        assert_eq!(
            waiting.join().unwrap(),
            [GenerationEvent::Finished {
                usage: usage(2, 6),
                reason: StopReason::StopString
            }]
        );
    }

    #[test]
    fn held_text_goes_out_at_the_engines_end_and_can_still_complete_a_stop_string() {
        // Held for "END", never completed: released before Finished.
        let (outbox, mut s) = stream(&["END"]);
        send_text(&outbox, "xEN");
        outbox.send(Emitted::Finished {
            usage: usage(1, 3),
            reason: StopReason::MaxTokens,
        });
        assert_eq!(
            drain(&mut s),
            [
                token("x"),
                token("EN"),
                GenerationEvent::Finished {
                    usage: usage(1, 3),
                    reason: StopReason::MaxTokens
                }
            ]
        );
        // The detokenizer's last bytes complete the stop string: that is why it stopped. A
        // lone 0xC3 is not a character: held by the detokenizer until the end, which releases
        // it as U+FFFD.
        let (outbox, mut s) = stream(&["a\u{FFFD}"]);
        send_text(&outbox, "a");
        outbox.send(Emitted::Token {
            id: 0xC3,
            logprobs: None,
        });
        outbox.send(Emitted::Finished {
            usage: usage(1, 2),
            reason: StopReason::MaxTokens,
        });
        assert_eq!(
            drain(&mut s),
            [GenerationEvent::Finished {
                usage: usage(1, 2),
                reason: StopReason::StopString
            }]
        );
    }

    #[test]
    fn the_end_says_whether_the_engine_still_holds_the_sequence_and_why_it_let_go() {
        let (outbox, s) = stream(&[]);
        let end = s.end();
        assert!(!end.is_retired() && !end.stalled());
        send_text(&outbox, "a");
        assert!(!end.is_retired(), "events are no end");
        drop(outbox);
        assert!(end.is_retired() && !end.stalled());
        // Dropped for stalling: marked before the last event goes out, readable unread.
        let (outbox, mut s) = stream(&[]);
        let end = s.end();
        send_text(&outbox, "a");
        outbox.mark_stalled();
        outbox.send(Emitted::Failed("stalled".into()));
        drop(outbox);
        assert!(end.is_retired() && end.stalled());
        assert_eq!(
            drain(&mut s),
            [token("a"), GenerationEvent::Failed("stalled".into())]
        );
    }

    #[test]
    fn failures_pass_through_and_a_vanished_engine_ends_the_stream() {
        let (outbox, mut s) = stream(&[]);
        send_text(&outbox, "a");
        outbox.send(Emitted::Failed("boom".into()));
        assert_eq!(
            drain(&mut s),
            [token("a"), GenerationEvent::Failed("boom".into())]
        );
        let (outbox, mut s) = stream(&[]);
        send_text(&outbox, "a");
        drop(outbox);
        assert_eq!(drain(&mut s), [token("a")]);
        // After a stop string the text is complete, whatever happens to the engine.
        let (outbox, mut s) = stream(&["a"]);
        send_text(&outbox, "a");
        drop(outbox);
        assert_eq!(
            drain(&mut s),
            [GenerationEvent::Finished {
                usage: usage(0, 1),
                reason: StopReason::StopString
            }]
        );
    }

    /// Polled as a `Stream` (as the server reads it), the events are the same, and a stream
    /// with nothing to hand out yet is pending, not ended.
    #[test]
    fn polling_sees_the_same_events() {
        use futures_core::Stream;
        let (outbox, mut s) = stream(&["!"]);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = |s: &mut TokenStream| std::pin::Pin::new(s).poll_next(&mut cx);
        assert_eq!(poll(&mut s), Poll::Pending);
        send_text(&outbox, "hi!");
        assert_eq!(poll(&mut s), Poll::Ready(Some(token("h"))));
        assert_eq!(poll(&mut s), Poll::Ready(Some(token("i"))));
        assert_eq!(poll(&mut s), Poll::Pending, "waits for the engine's end");
        outbox.send(Emitted::Finished {
            usage: usage(1, 3),
            reason: StopReason::MaxTokens,
        });
        assert_eq!(
            poll(&mut s),
            Poll::Ready(Some(GenerationEvent::Finished {
                usage: usage(0, 3),
                reason: StopReason::StopString
            }))
        );
        assert_eq!(poll(&mut s), Poll::Ready(None));
    }
}
