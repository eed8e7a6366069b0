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
use std::sync::Arc;

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
            .and_then(|m| m.map_err(|e| e.to_string()));
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
            .map_err(|e| format!("the output format rejected a token: {e}"))
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
    factory: ParserFactory,
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
        // Bounded work per mask (llguidance's defaults: ~10 ms at worst).
        *factory.limits_mut() = ParserLimits::default();
        Ok(Self { factory })
    }

    /// Compiles `format` and computes its first mask. A schema or grammar llguidance cannot
    /// compile (or that allows nothing) is [`EngineError::InvalidFormat`]. CPU work: call it
    /// off the async runtime's workers.
    pub fn compile(&self, format: &OutputFormat) -> Result<Constraint> {
        let grammar = match format {
            OutputFormat::Text => return Ok(Constraint::Free),
            OutputFormat::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact_json(schema.clone()))
            }
            OutputFormat::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let invalid = |e: String| EngineError::InvalidFormat(e);
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| invalid("the grammar engine panicked on this schema".into()))?
            .map_err(|e| invalid(e.to_string()))?;
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
