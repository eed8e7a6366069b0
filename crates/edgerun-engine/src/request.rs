//! What a caller asks the engine for, in the engine's own terms.
//!
//! The server turns each API dialect's wire request into these types (resolving every default
//! and every "not given" once, there), so nothing on the engine's hot path looks at an `Option`
//! or knows which API a request came from. The engine does not depend on `edgerun-protocol`.

use crate::constraint::Constraint;
use serde::Serialize;
use serde_json::Value;

/// One chat message as chat templates see it: `role`, `content`, and the optional fields only
/// when present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool` (the template decides what it accepts).
    pub role: String,
    pub content: String,
    /// For `tool` messages: the id of the call this answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `assistant` messages: the calls it made, kept verbatim for the template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// Participant or tool name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with just a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_call_id: None,
            tool_calls: None,
            name: None,
        }
    }
}

/// What to generate from, before templating and tokenizing ([`crate::Engine::prepare`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// A bare prompt: one user message through the chat template, or the text as it is when
    /// `raw` is set.
    Prompt { text: String, raw: bool },
    /// A conversation, rendered by the chat template.
    Messages(Vec<ChatMessage>),
}

/// How the next token is chosen, every parameter resolved. The neutral value of each switches
/// it off.
///
/// Order of operations (as in vLLM / Hugging Face): repetition penalty over prompt and output
/// tokens; frequency and presence penalties over output tokens (OpenAI's definition); then
/// temperature, top-k and top-p.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// `<= 0`: greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; `0`: all. `1` is greedy.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; `>= 1`:
    /// all.
    pub top_p: f32,
    /// The sequence's RNG seed. A request without one gets a random seed when it is resolved,
    /// never here.
    pub seed: u64,
    /// Divides positive (multiplies negative) logits of every token seen in the prompt or the
    /// output; `1` (or anything `<= 0`): off.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the output; `0`: off.
    pub frequency_penalty: f32,
    /// Subtracted once from every token present in the output; `0`: off.
    pub presence_penalty: f32,
    /// Whether each generated token's log-probability (and the most likely alternatives) is
    /// reported with its text. Reporting never changes which token is chosen.
    pub logprobs: Logprobs,
}

/// Log-probabilities to report with each generated token ([`crate::TokenLogprob`]).
///
/// They are the model's own distribution: a log-softmax over the raw logits of the step,
/// before penalties, temperature, top-k and top-p (vLLM's default, `raw_logprobs`), so they do
/// not depend on the sampling parameters and are always `<= 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Logprobs {
    /// Nothing reported (no work done).
    #[default]
    Off,
    /// The chosen token's log-probability, and the `top` most likely tokens of the step.
    Report { top: usize },
}

impl SamplingConfig {
    /// Argmax decoding, no penalties.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        repetition_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        logprobs: Logprobs::Off,
    };

    /// Whether the choice is the argmax of the (penalised) logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Whether the repetition penalty does anything.
    pub fn has_repetition_penalty(&self) -> bool {
        self.repetition_penalty != 1.0 && self.repetition_penalty > 0.0
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::GREEDY
    }
}

/// When a sequence stops, besides the model's own end-of-turn tokens and the end of the context
/// window (which every sequence applies). `max_tokens` is a rule of `Sequence` (`sequence.rs`, on
/// the engine thread); stop strings are applied to the text by the reader's stream (`output.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCriteria {
    /// Tokens to generate at most (at least 1).
    pub max_tokens: usize,
    /// Stop strings: generation ends as soon as the text contains one of them, and the text
    /// released ends just before it (the stop string itself is never sent). Text that could be
    /// the start of one is held back until it is known not to be. Each must be non-empty;
    /// empty: no stop strings.
    pub stop: Vec<String>,
}

impl StopCriteria {
    /// Only `max_tokens` (and the rules every sequence applies).
    pub fn max_tokens(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            stop: Vec::new(),
        }
    }
}

/// One generation, ready for [`crate::Engine::submit`].
#[derive(Debug)]
pub struct GenerationRequest {
    /// The prompt's token ids (what [`crate::Engine::prepare`] returns).
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    pub stopping: StopCriteria,
    /// What the output must look like (what [`crate::Engine::constrain`] returns), or
    /// [`Constraint::Free`].
    pub constraint: Constraint,
}

impl GenerationRequest {
    /// Free text from `prompt`.
    pub fn new(prompt: Vec<u32>, sampling: SamplingConfig, stopping: StopCriteria) -> Self {
        Self {
            prompt,
            sampling,
            stopping,
            constraint: Constraint::Free,
        }
    }
}

/// What [`crate::Engine::submit`] does when no batch slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueuePolicy {
    /// Wait in the queue (refused only when the queue itself is full).
    #[default]
    Wait,
    /// Refuse at once (Workers AI's `options.rejectIfBusy`).
    RejectIfBusy,
}

/// A token and its log-probability (see [`Logprobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LogprobEntry {
    pub id: u32,
    /// What the token stands for ([`crate::TextTokenizer::token_bytes`]): possibly part of a
    /// UTF-8 character.
    pub bytes: Vec<u8>,
    /// `<= 0`; at least [`crate::MIN_LOGPROB`].
    pub logprob: f32,
}

/// A generated token's log-probability and the step's most likely tokens (most likely first),
/// sent with the text the token completed ([`crate::GenerationEvent::Token`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub chosen: LogprobEntry,
    pub top: Vec<LogprobEntry>,
}

/// Tokens read and written by one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Generated tokens, the end-of-turn token included when one ended the sequence.
    pub completion_tokens: usize,
    /// Of `prompt_tokens`, those whose keys and values came from the prefix cache (not
    /// computed for this request).
    pub cached_tokens: usize,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced one of its end-of-turn tokens (counted, not shown).
    EndOfTurn,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The context window is full.
    ContextFull,
    /// The text reached one of the caller's stop strings (not shown); found by the reader.
    StopString,
}

impl StopReason {
    /// Cut short by a length limit rather than ended by the model (OpenAI's `"length"` as
    /// opposed to `"stop"`).
    pub fn is_length(&self) -> bool {
        matches!(self, Self::MaxTokens | Self::ContextFull)
    }
}
