//! Constrained decoding: an [`OutputFormat`] (a JSON schema, or a Lark grammar such as a tool
//! call's) compiled into a per-step token mask, so that the output always parses.
//!
//! The grammar engine is [llguidance](https://github.com/guidance-ai/llguidance) (what llama.cpp
//! and vLLM use): a [`GrammarCompiler`] is built once per model from the tokenizer's byte
//! strings (a token trie), and compiles each request's format into a [`Constraint`] holding a
//! `Matcher`, on the caller's thread ([`crate::Engine::constrain`]), where a bad schema is an
//! [`EngineError::InvalidFormat`] and the first mask is computed before the request queues.
//!
//! Per step, for each constrained sequence that samples (`scheduler`): the mask of allowed next
//! tokens is computed on a side thread *while the forward pass runs* (it depends only on the
//! tokens already consumed), so other sequences in the batch wait for max(forward, mask), not
//! the sum; `Sequence::sample` sets every disallowed logit to `-inf` before the sampler (the
//! log-probabilities reported stay the model's own); `Sequence::accept` feeds the chosen token
//! to the matcher, and a grammar that is complete ends the sequence like an end-of-turn token
//! (without spending a step to sample one).
//!
//! ## Bounds (a caller's schema is untrusted code)
//!
//! llguidance builds a schema by recursion, following `$ref`s; a deep enough schema overflows a
//! thread's stack, which no `catch_unwind` can stop: the process aborts. So:
//!
//! * the wire layer measures every schema before it gets here (`edgerun-protocol`'s `limits`:
//!   size, nodes, depth following `$ref`s, `$ref` chains), and [`GrammarLimits::max_depth`] is
//!   the depth it lets through;
//! * every compile runs on a thread of its own whose stack is sized for that depth
//!   ([`GrammarLimits::stack_bytes`]: [`STACK_PER_LEVEL`] per level, measured with a margin,
//!   plus [`STACK_BASE`]), never on an async worker or the engine thread;
//! * the compile has a time budget ([`GrammarLimits::compile_budget`]): past it the request gets
//!   [`EngineError::FormatLimit`] (a 400) at once, and the thread is left to finish, which
//!   llguidance's own fuel limits ([`parser_limits`]) guarantee; at most
//!   [`MAX_COMPILES_IN_FLIGHT`] compiles run at once, beyond that a request is busy (429);
//! * every mask has bounded work ([`parser_limits`]: lexer fuel, Earley items, lexer states,
//!   grammar size), and errors carry no parser state (`verbose_errors` off): messages are
//!   the first line of llguidance's, at most [`MAX_MESSAGE_CHARS`] long.
//!
//! A grammar that fails *during* generation (a schema no finite JSON satisfies, a mask over its
//! fuel) is the caller's schema, not an engine failure: the sequence ends with
//! `GenerationEvent::FormatUnmet` (a 400), and `sequences_failed` does not count it.
//!
//! Special tokens (control tokens such as `<|im_end|>`) are marked special in the trie, so no
//! grammar ever lets one through as text; the model's end-of-turn tokens are allowed exactly
//! when the grammar may end. JSON is compact: `", "` and `": "` separators and no other
//! whitespace between tokens (small models otherwise pad with newlines until `max_tokens`),
//! unless the schema asks otherwise with llguidance's own `x-guidance` options.

use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Stack a compile needs per level of schema depth (containers on the deepest path, following
/// `$ref`s), with a margin: llguidance spends about 3.5 KiB per level in a release build
/// (measured: a chain of 597 one-level `$ref`s overflowed 2 MiB), up to ~2.5 KiB more for each
/// level of an `allOf` intersection.
pub const STACK_PER_LEVEL: usize = 32 * 1024;
/// Stack a compile needs whatever the depth (the Lark front end, the lexer, the first mask).
pub const STACK_BASE: usize = 8 << 20;
/// Levels the call grammar of a forced tool adds around its `parameters` (see `tools.rs`).
pub const WRAPPER_LEVELS: usize = 8;
/// Compiles running at once (those past their budget included) beyond which a request is
/// busy.
pub const MAX_COMPILES_IN_FLIGHT: usize = 8;
/// Longest grammar-engine message passed on to a caller.
pub const MAX_MESSAGE_CHARS: usize = 300;

/// How compiling a caller's format is bounded (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarLimits {
    /// The deepest schema the wire layer lets through (containers, following `$ref`s): sizes
    /// the compile thread's stack.
    pub max_depth: usize,
    /// How long a compile (and its first mask) may take before the request is refused.
    pub compile_budget: Duration,
}

impl GrammarLimits {
    /// Depth 128 (the wire layer's default) and 500 ms.
    pub const DEFAULT: Self = Self {
        max_depth: 128,
        compile_budget: Duration::from_millis(500),
    };

    /// The compile thread's stack: [`STACK_BASE`] plus [`STACK_PER_LEVEL`] for each level of
    /// the deepest schema allowed, the call grammar's own levels included.
    pub fn stack_bytes(&self) -> usize {
        STACK_BASE.saturating_add(
            self.max_depth
                .saturating_add(WRAPPER_LEVELS)
                .saturating_mul(STACK_PER_LEVEL),
        )
    }
}

impl Default for GrammarLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// llguidance's limits, explicit (its defaults, but no parser state in errors): each mask costs
/// at most ~15 ms of lexer work and ~2.5 ms of Earley items, a lexer at most 250,000 states, a
/// grammar at most 500,000 symbols, the initial lexer at most ~20 ms of fuel.
pub fn parser_limits() -> ParserLimits {
    ParserLimits {
        max_items_in_row: 2000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_lexer_states: 250_000,
        max_grammar_size: 500_000,
        precompute_large_lexemes: true,
        verbose_errors: false,
    }
}

/// A grammar-engine message fit for a caller: its first line, without parser state, clipped.
pub(crate) fn clean_message(message: &str) -> String {
    let first = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("the grammar engine refused the format");
    if first.chars().count() <= MAX_MESSAGE_CHARS {
        first.to_string()
    } else {
        let clipped: String = first.chars().take(MAX_MESSAGE_CHARS).collect();
        format!("{clipped}...")
    }
}

/// What the generated text must be, in the engine's terms.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum OutputFormat {
    /// Free text.
    #[default]
    Text,
    /// A JSON value valid against this JSON Schema (`{"type": "object"}` for "any object").
    JsonSchema(Value),
    /// Text in this Lark grammar (llguidance's dialect: `%json {...}` embeds a JSON schema).
    Lark(String),
}

/// A request's compiled format, ready for the scheduler.
#[derive(Debug, Default)]
pub enum Constraint {
    /// Any token may follow.
    #[default]
    Free,
    /// Only tokens the grammar allows may follow.
    Grammar(Box<Grammar>),
}

/// One sequence's grammar state: the matcher, and the mask for its next token once computed.
pub struct Grammar {
    matcher: Matcher,
    mask: Option<Result<SimpleVob, String>>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .field("mask_ready", &self.mask.is_some())
            .finish()
    }
}

impl Grammar {
    /// Computes the mask of the next token, if not done yet. Never panics (llguidance's
    /// panics become the error the sequence fails with).
    pub(crate) fn prepare_mask(&mut self) {
        if self.mask.is_some() {
            return;
        }
        let matcher = &mut self.matcher;
        let mask = catch_unwind(AssertUnwindSafe(|| matcher.compute_mask_or_eos()))
            .map_err(|_| "the grammar engine panicked".to_string())
            .and_then(|m| m.map_err(|e| clean_message(&e.to_string())));
        self.mask = Some(mask);
    }

    /// Sets every token the grammar does not allow next to `-inf`. Fails when the mask could
    /// not be computed, or allows nothing the model can produce.
    pub(crate) fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare_mask();
        let mask = self.mask.take().expect("prepared above")?;
        let mut allowed = false;
        let known = mask.len();
        for (id, logit) in logits.iter_mut().enumerate() {
            if id < known && mask.get(id) {
                allowed |= !logit.is_nan();
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if allowed {
            Ok(())
        } else {
            Err("the output format allows no token here".into())
        }
    }

    /// Advances the grammar past a chosen token.
    pub(crate) fn consume(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        let matcher = &mut self.matcher;
        catch_unwind(AssertUnwindSafe(|| matcher.consume_token(token)))
            .map_err(|_| "the grammar engine panicked".to_string())?
            .map_err(|e| {
                format!(
                    "the output format rejected a token: {}",
                    clean_message(&e.to_string())
                )
            })
    }

    /// The grammar is complete: nothing but an end-of-turn token may follow.
    pub(crate) fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

impl Constraint {
    /// The grammar, when there is one.
    pub(crate) fn grammar(&mut self) -> Option<&mut Grammar> {
        match self {
            Self::Free => None,
            Self::Grammar(g) => Some(g),
        }
    }
}

/// Compiles [`OutputFormat`]s for one model's vocabulary. Built once per model (the token trie
/// costs tens of milliseconds for a 128k vocabulary).
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    /// Compile threads still running (see [`MAX_COMPILES_IN_FLIGHT`]).
    in_flight: Arc<AtomicUsize>,
}

/// The tokenizer as llguidance sees it: byte strings per id, special tokens marked.
struct TokenizerForGrammar {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for TokenizerForGrammar {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_plain(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl GrammarCompiler {
    /// Builds the token trie of `tokenizer` over `vocab_size` ids (the model's logits width;
    /// ids the tokenizer does not know are never allowed). `stop_ids` may end a grammar.
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        vocab_size: usize,
        stop_ids: &BTreeSet<u32>,
    ) -> Result<Self> {
        let specials = tokenizer.special_ids();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if specials.contains(&id) && !bytes.is_empty() {
                    let mut marked = Vec::with_capacity(bytes.len() + 1);
                    marked.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    marked.extend(bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let eos: Vec<u32> = stop_ids.iter().copied().collect();
        let Some(&first_eos) = eos.first() else {
            return Err(EngineError::Tokenizer(
                "the model has no end-of-turn token; constrained output cannot end".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(TokenizerForGrammar { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| {
            EngineError::Tokenizer(format!("cannot build the grammar engine's trie: {e}"))
        })?;
        factory.quiet();
        // Bounded work per mask, no parser state in errors.
        *factory.limits_mut() = parser_limits();
        Ok(Self {
            factory: Arc::new(factory),
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Compiles `format` and computes its first mask, within `limits`, on a thread of its own
    /// (see the module docs). A schema or grammar llguidance cannot compile (or that allows
    /// nothing) is [`EngineError::InvalidFormat`]; one past the time budget is
    /// [`EngineError::FormatLimit`]; too many compiles at once, [`EngineError::Busy`]. Blocks
    /// the caller (at most the budget): call it off the async runtime's workers.
    pub fn compile(&self, format: &OutputFormat, limits: &GrammarLimits) -> Result<Constraint> {
        let grammar = match format {
            OutputFormat::Text => return Ok(Constraint::Free),
            OutputFormat::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact_json(schema.clone()))
            }
            OutputFormat::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_COMPILES_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Busy);
        }
        let in_flight = InFlight(self.in_flight.clone());
        let factory = self.factory.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("edgerun-grammar-compile".into())
            .stack_size(limits.stack_bytes())
            .spawn(move || {
                let _in_flight = in_flight;
                // The receiver may be gone (past the budget): the grammar is dropped here.
                let _ = tx.send(compile_here(&factory, grammar));
            });
        if let Err(e) = spawned {
            return Err(EngineError::InvalidFormat(format!(
                "cannot start a grammar thread: {e}"
            )));
        }
        match rx.recv_timeout(limits.compile_budget) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(EngineError::FormatLimit(format!(
                    "compiling it took longer than {} ms (the grammar compile-time limit)",
                    limits.compile_budget.as_millis()
                )))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(
                EngineError::InvalidFormat("the grammar engine stopped on this format".into()),
            ),
        }
    }
}

/// Counts a compile thread while it runs.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The compile itself, on the compile thread.
fn compile_here(factory: &ParserFactory, grammar: TopLevelGrammar) -> Result<Constraint> {
    let invalid = |e: String| EngineError::InvalidFormat(e);
    let parser = catch_unwind(AssertUnwindSafe(|| factory.create_parser(grammar)))
        .map_err(|_| invalid("the grammar engine panicked on this schema".into()))?
        .map_err(|e| invalid(clean_message(&e.to_string())))?;
    let mut grammar = Grammar {
        matcher: Matcher::new(Ok(parser)),
        mask: None,
    };
    grammar.prepare_mask();
    match &grammar.mask {
        Some(Ok(mask)) if !mask.is_zero() => Ok(Constraint::Grammar(Box::new(grammar))),
        Some(Err(e)) => Err(invalid(e.clone())),
        _ => Err(invalid("the schema allows no output".into())),
    }
}

/// The schema with llguidance's compact-JSON options, unless it sets its own.
fn compact_json(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "item_separator": ", ",
                "key_separator": ": ",
                "whitespace_flexible": false,
            })
        });
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_no_parser_state() {
        let dump = "Parser Error: token \"x\" doesn't satisfy the grammar\n<state>\n  rows: 12\n  items: ...";
        assert_eq!(
            clean_message(dump),
            "Parser Error: token \"x\" doesn't satisfy the grammar"
        );
        let long = "e".repeat(1000);
        assert_eq!(clean_message(&long).chars().count(), MAX_MESSAGE_CHARS + 3);
        assert!(!parser_limits().verbose_errors);
        // The stack grows with the depth allowed.
        let deep = GrammarLimits {
            max_depth: 4096,
            ..GrammarLimits::DEFAULT
        };
        assert!(deep.stack_bytes() > GrammarLimits::DEFAULT.stack_bytes());
        assert_eq!(
            GrammarLimits::DEFAULT.stack_bytes(),
            STACK_BASE + (128 + WRAPPER_LEVELS) * STACK_PER_LEVEL
        );
    }

    #[test]
    fn compact_options_are_added_unless_given() {
        let s = compact_json(serde_json::json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        let own =
            serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(compact_json(own.clone()), own);
        // Boolean schemas are left alone.
        assert_eq!(compact_json(Value::Bool(true)), Value::Bool(true));
    }
}
