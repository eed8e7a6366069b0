//! The seam between HTTP and batching: what the server needs from whatever generates text.
//!
//! The routes and [`crate::generation`] hold a [`Backend`] (in [`crate::AppState`]), never the
//! engine itself, so everything above the engine — routes, framing, heartbeats, error mapping —
//! runs the same over [`edgerun_engine::Engine`] (implemented here) and over
//! [`crate::fake::FakeBackend`], which plays scripted events in tests without a model.
//!
//! A request goes in through three states whose types fix the order: [`Backend::reserve`]
//! takes a queue place (or answers `Busy`) before any work proportional to the prompt, giving a
//! [`Reservation`]; [`Reservation::prepare`] templates, tokenizes and compiles the output
//! format (blocking: the server calls it on the prepare pool), giving a [`Submission`];
//! [`Submission::submit`] queues it, giving the [`Events`] the response reads. Dropping a
//! state unused gives the place back; dropping the [`Events`] cancels the generation.

use edgerun_engine::{
    EmbedInput, EmbedStats, EmbedderInfo, EngineError, GenerationEvent, GrammarLimits, Health,
    OutputFormat, Pooling, PromptInput, QueuePolicy, SamplingConfig, SequenceEnd, StatsSnapshot,
    StopCriteria, TokenStream, Tool, ToolCalling,
};
use futures::future::BoxFuture;
use std::sync::Arc;

type Result<T> = std::result::Result<T, EngineError>;

/// What generates text for the server.
pub trait Backend: Send + Sync + 'static {
    /// Takes a place in the queue, or answers [`EngineError::Busy`]. Cheap: called before the
    /// prompt is read.
    fn reserve(&self, policy: QueuePolicy) -> Result<Box<dyn Reservation>>;
    /// How the model writes tool calls.
    fn tool_calling(&self) -> ToolCalling;
    /// Whether it can serve (what `/health` reports).
    fn health(&self) -> Health;
    fn stats(&self) -> StatsSnapshot;
    /// Prompt plus `max_tokens` may not exceed this.
    fn context_window(&self) -> usize;
}

/// A queue place, not yet prepared.
pub trait Reservation: Send {
    /// Templates and tokenizes the prompt with `tools` and compiles `format` within `limits`.
    /// Blocks: call it off the async runtime's workers.
    fn prepare(
        self: Box<Self>,
        prompt: &PromptInput,
        tools: &[Tool],
        format: &OutputFormat,
        limits: &GrammarLimits,
    ) -> Result<Box<dyn Submission>>;
}

/// A prepared request in its queue place.
pub trait Submission: Send {
    /// Queues the generation; fails at once (malformed, or past the context window or the KV
    /// budget).
    fn submit(
        self: Box<Self>,
        sampling: SamplingConfig,
        stopping: StopCriteria,
    ) -> Result<Box<dyn Events>>;
}

/// A generation's events, in order, ending after `Finished`, `Failed` or `FormatUnmet` (or
/// `None` when the backend let it go without one). Dropping it cancels the generation.
pub trait Events: futures::Stream<Item = GenerationEvent> + Send + Unpin {
    /// How the backend is done with the generation, as a handle that outlives the stream.
    fn end(&self) -> Arc<dyn EndState>;
}

/// Whether the backend still holds a generation, and whether it dropped it for stalling.
pub trait EndState: Send + Sync {
    /// The backend let the generation go (its last event is out or it was dropped).
    fn is_retired(&self) -> bool;
    /// It was dropped because its reader stopped reading; its last event says so.
    fn stalled(&self) -> bool;
}

impl Backend for edgerun_engine::Engine {
    fn reserve(&self, policy: QueuePolicy) -> Result<Box<dyn Reservation>> {
        Ok(Box::new(edgerun_engine::Engine::reserve(self, policy)?))
    }
    fn tool_calling(&self) -> ToolCalling {
        edgerun_engine::Engine::tool_calling(self)
    }
    fn health(&self) -> Health {
        edgerun_engine::Engine::health(self)
    }
    fn stats(&self) -> StatsSnapshot {
        edgerun_engine::Engine::stats(self)
    }
    fn context_window(&self) -> usize {
        edgerun_engine::Engine::context_window(self)
    }
}

impl Reservation for edgerun_engine::Reserved {
    fn prepare(
        self: Box<Self>,
        prompt: &PromptInput,
        tools: &[Tool],
        format: &OutputFormat,
        limits: &GrammarLimits,
    ) -> Result<Box<dyn Submission>> {
        Ok(Box::new(edgerun_engine::Reserved::prepare(
            *self, prompt, tools, format, limits,
        )?))
    }
}

impl Submission for edgerun_engine::Prepared {
    fn submit(
        self: Box<Self>,
        sampling: SamplingConfig,
        stopping: StopCriteria,
    ) -> Result<Box<dyn Events>> {
        Ok(Box::new(edgerun_engine::Prepared::submit(
            *self, sampling, stopping,
        )?))
    }
}

impl Events for TokenStream {
    fn end(&self) -> Arc<dyn EndState> {
        Arc::new(TokenStream::end(self))
    }
}

impl EndState for SequenceEnd {
    fn is_retired(&self) -> bool {
        SequenceEnd::is_retired(self)
    }
    fn stalled(&self) -> bool {
        SequenceEnd::stalled(self)
    }
}

/// What embeds text for the server: an embedding model's batching thread
/// ([`edgerun_engine::Embedder`]), or a fake in tests.
pub trait EmbedBackend: Send + Sync + 'static {
    /// Dimensions, input length limit, default pooling.
    fn info(&self) -> EmbedderInfo;
    /// Token ids of each input (refused when longer than the model reads, unless `truncate`).
    /// Blocks: call it off the async runtime's workers.
    fn tokenize(&self, inputs: &[EmbedInput], truncate: bool) -> Result<Vec<Vec<u32>>>;
    /// Queues the inputs ([`EngineError::Busy`] when the queue is full); the future gives one
    /// vector per input, in order. Dropping it abandons the job.
    fn submit(
        &self,
        tokens: Vec<Vec<u32>>,
        pooling: Pooling,
    ) -> Result<BoxFuture<'static, Result<Vec<Vec<f32>>>>>;
    fn stats(&self) -> EmbedStats;
    /// Whether it can still embed (what `/health` reports).
    fn is_running(&self) -> bool;
}

impl EmbedBackend for edgerun_engine::Embedder {
    fn info(&self) -> EmbedderInfo {
        edgerun_engine::Embedder::info(self).clone()
    }
    fn tokenize(&self, inputs: &[EmbedInput], truncate: bool) -> Result<Vec<Vec<u32>>> {
        edgerun_engine::Embedder::tokenize(self, inputs, truncate)
    }
    fn submit(
        &self,
        tokens: Vec<Vec<u32>>,
        pooling: Pooling,
    ) -> Result<BoxFuture<'static, Result<Vec<Vec<f32>>>>> {
        let ticket = edgerun_engine::Embedder::submit(self, tokens, pooling)?;
        Ok(Box::pin(ticket.wait()))
    }
    fn stats(&self) -> EmbedStats {
        edgerun_engine::Embedder::stats(self)
    }
    fn is_running(&self) -> bool {
        edgerun_engine::Embedder::is_running(self)
    }
}
