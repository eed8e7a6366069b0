//! The engine's one error type.

use thiserror::Error;

/// Everything that can go wrong inside the engine. The HTTP layer maps each variant to a
/// Workers AI error envelope in exactly one place (`edgerun-server`'s `error.rs`).
#[derive(Debug, Error)]
pub enum EngineError {
    /// The model file is missing, unreadable, or not an architecture this build runs.
    #[error("cannot load model: {0}")]
    Load(String),
    /// This machine cannot run this build on the device asked for (driver too old, GPU older
    /// than the kernels, no CUDA compiled in): the one line says what to install or rebuild.
    #[error("{0}")]
    Preflight(crate::device::preflight::Mismatch),
    /// A setting the engine cannot run with (refused at start-up, never clamped).
    #[error("invalid engine setting: {0}")]
    Config(String),
    /// A request the engine cannot run as given (the wire layer should have refused it).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render (for example `raise_exception` fired).
    #[error("chat template error: {0}")]
    Template(String),
    /// The requested output format (a JSON schema or grammar) cannot be compiled.
    #[error("invalid output format: {0}")]
    InvalidFormat(String),
    /// The requested output format is over a limit of the grammar engine (compile time): the
    /// message names the limit.
    #[error("output format over a limit: {0}")]
    FormatLimit(String),
    /// The prompt plus `max_tokens` does not fit in the model's context window.
    #[error("prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}; together they exceed the context window of {context_window} tokens")]
    ContextWindowExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        context_window: usize,
    },
    /// The request's KV cache (prompt + `max_tokens` positions) exceeds the node's KV budget.
    #[error("prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {needed_mib} MiB of KV cache; this node allows {budget_mib} MiB: lower max_tokens or shorten the prompt")]
    KvCacheBudgetExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        needed_mib: usize,
        budget_mib: usize,
    },
    /// The scheduler's queue is full (or the caller asked to be rejected when busy).
    #[error("capacity temporarily exceeded")]
    Busy,
    /// The engine thread has stopped (shutdown or a fatal error); no new work is accepted.
    #[error("the engine is not running")]
    Stopped,
    /// A tensor operation failed while running the model.
    #[error("model execution failed: {0}")]
    Model(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
