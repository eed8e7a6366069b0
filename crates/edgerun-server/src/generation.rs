//! The one "start a generation" path every API dialect goes through, and the seam where
//! dialects differ: how a stream is framed.
//!
//! A dialect's route (`routes/<dialect>.rs`) reads and validates its wire request, converts it
//! into a [`GenerationInput`] (the engine's own types, every default resolved), calls [`start`],
//! and then either [`Generation::collect`]s the whole answer into its JSON shape or
//! [`Generation::stream`]s it through its [`Framing`]. Everything in between is shared:
//! refusing while draining, admission before any work proportional to the prompt (a 429 costs
//! the same for a 32 KiB prompt as for a short one), templating and tokenizing on the bounded
//! prepare pool, the first-event grace that lets an immediate failure still get a status code,
//! heartbeats, the drain deadline's cut, latency metrics, and the mapping of engine failures to
//! wire errors (always through [`ServerError::api_error`]). An output format the generation
//! cannot follow further (`GenerationEvent::FormatUnmet`: the caller's schema) is a 400, not an
//! engine failure.
//!
//! A stream is never silent for longer than the heartbeat interval: the interval counts from
//! the last frame that went out, not from the last engine event, so a stream whose text is held
//! back (a forced tool call is held whole until the end; text that may start a call or a stop
//! string until it is decided) gets `: keep-alive` comments like a queued one. A dialect may
//! open its stream with bytes of its own as soon as the headers are out
//! ([`Framing::opening`]: OpenAI's role chunk).

use crate::backend::{EndState, Events};
use crate::error::ServerError;
use crate::telemetry;
use crate::{AppState, Drain, GenerationSlot};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::Response;
use edgerun_engine::{
    GenerationEvent, OutputFormat, PromptInput, QueuePolicy, SamplingConfig, StopCriteria,
    StopReason, TokenLogprob, Tool, ToolCall, ToolCalling, ToolChoice, Usage,
};
use edgerun_protocol::{sse, ApiError, ResponseFormat};
use futures::StreamExt;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a streaming response waits for the engine's first event before sending headers.
const FIRST_EVENT_GRACE: Duration = Duration::from_secs(1);

/// A request in the engine's terms, as a dialect hands it over.
#[derive(Debug, Clone)]
pub struct GenerationInput {
    pub prompt: PromptInput,
    /// Tools the model may call (empty: none, also for `tool_choice: "none"`).
    pub tools: Vec<Tool>,
    /// Whether a call is forced (only read with tools).
    pub tool_choice: ToolChoice,
    pub sampling: SamplingConfig,
    pub stopping: StopCriteria,
    /// What the output must look like (JSON mode), compiled with the prompt.
    pub format: OutputFormat,
    pub policy: QueuePolicy,
}

/// A dialect's tools in the engine's terms; `tool_choice: "none"` hides them from the model.
pub fn engine_tools(
    tools: Vec<edgerun_protocol::ToolDefinition>,
    choice: edgerun_protocol::ToolChoice,
) -> (Vec<Tool>, ToolChoice) {
    use edgerun_protocol::ToolChoice as Wire;
    let choice = match choice {
        Wire::None => return (Vec::new(), ToolChoice::Auto),
        Wire::Auto => ToolChoice::Auto,
        Wire::Required => ToolChoice::Required,
        Wire::Function(name) => ToolChoice::Function(name),
    };
    let tools = tools
        .into_iter()
        .map(|t| Tool {
            name: t.name,
            description: t.description,
            parameters: t.parameters,
        })
        .collect();
    (tools, choice)
}

/// A dialect's `response_format` in the engine's terms (the same for both dialects).
pub fn output_format(format: &ResponseFormat) -> OutputFormat {
    match format.schema() {
        None => OutputFormat::Text,
        Some(schema) => OutputFormat::JsonSchema(schema),
    }
}

/// The queue policy a dialect's `rejectIfBusy`-style flag asks for.
pub fn queue_policy(reject_if_busy: bool) -> QueuePolicy {
    if reject_if_busy {
        QueuePolicy::RejectIfBusy
    } else {
        QueuePolicy::Wait
    }
}

/// The engine's token counts in the wire's shape (saturating at `u32::MAX`), the prefix
/// cache's share of the prompt always included.
pub fn wire_usage(usage: &Usage) -> edgerun_protocol::Usage {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    edgerun_protocol::Usage::new(count(usage.prompt_tokens), count(usage.completion_tokens))
        .with_cached_tokens(count(usage.cached_tokens))
}

/// The seed for a request: the caller's, or a fresh random one (decided once, here, so the
/// engine never sees "no seed").
pub fn resolve_seed(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(rand::random)
}

/// A generation the engine accepted.
pub struct Generation {
    stream: Box<dyn Events>,
    timer: TokenTimer,
    drain: Arc<Drain>,
    /// How to read tool calls out of the answer, when the request gave tools.
    tool_calling: Option<ToolCalling>,
}

/// A finished generation's whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The answer's text, without the tool calls.
    pub text: String,
    /// The tool calls the model made (only when the request gave tools).
    pub tool_calls: Vec<ToolCall>,
    /// One per generated token when log-probabilities were asked for, else empty.
    pub logprobs: Vec<TokenLogprob>,
    pub usage: Usage,
    pub reason: StopReason,
}

/// Takes a place in the backend's queue ([`crate::backend`]: reserved → prepared →
/// submitted) of `model`'s backend, templates and tokenizes the prompt on the prepare pool,
/// then submits it. `started` is when the request arrived (for time-to-first-token).
pub async fn start(
    state: &AppState,
    model: &GenerationSlot,
    input: GenerationInput,
    started: Instant,
) -> Result<Generation, ServerError> {
    if state.drain.is_draining() {
        return Err(ServerError::Draining);
    }
    let engine = model.backend.get().ok_or(ServerError::NotReady)?.clone();
    let GenerationInput {
        prompt,
        tools,
        tool_choice,
        sampling,
        stopping,
        format,
        policy,
    } = input;
    let tool_calling = engine.tool_calling();
    // A forced call is a grammar over the functions' parameters (`tools.rs`).
    let format = match (tool_calling.grammar(&tools, &tool_choice), format) {
        (None, format) => format,
        (Some(grammar), OutputFormat::Text) => grammar,
        (Some(_), _) => {
            return Err(ApiError::bad_input(
                "tool_choice that forces a call and response_format cannot be combined",
            )
            .into())
        }
    };
    // Whose format it is, named in a compile error: a forced call's, or response_format's.
    let origin = if matches!(format, OutputFormat::Lark(_)) {
        "the forced tool call's parameters"
    } else {
        "response_format's schema"
    };
    let grammar_limits = state.grammar;
    let tool_calling = (!tools.is_empty()).then_some(tool_calling);
    // Busy is decided here, before any work that grows with the prompt.
    let reservation = engine.reserve(policy)?;
    let prepare = async {
        let permit = state.prepare_permit().await?;
        // The permit goes with the work: a client that hangs up does not free it early. The
        // output format compiles here too (a bad schema is a 400 before the request queues), on
        // a thread of its own with a stack sized for the deepest schema the wire layer lets
        // through, within its time budget (the engine's `constrain_within`).
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            reservation
                .prepare(&prompt, &tools, &format, &grammar_limits)
                .map_err(|e| name_format(e, origin))
        })
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?
        .map_err(ServerError::from)
    };
    let prepared = tokio::select! {
        prepared = prepare => prepared?,
        _ = state.drain.cut_signal() => {
            state.drain.note_cut();
            return Err(ServerError::Cut);
        }
    };
    let stream = prepared.submit(sampling, stopping)?;
    Ok(Generation {
        stream,
        timer: TokenTimer::new(started),
        drain: state.drain.clone(),
        tool_calling,
    })
}

/// A compile error with whose format it is (`origin`) in its message.
fn name_format(e: edgerun_engine::EngineError, origin: &str) -> edgerun_engine::EngineError {
    use edgerun_engine::EngineError::{FormatLimit, InvalidFormat};
    match e {
        InvalidFormat(m) => InvalidFormat(format!("{origin}: {m}")),
        FormatLimit(m) => FormatLimit(format!("{origin}: {m}")),
        e => e,
    }
}

/// How one dialect frames a streamed generation. Each method returns the bytes to send.
pub trait Framing: Send + 'static {
    /// The stream's first bytes, sent as soon as the body starts, before any engine event
    /// (OpenAI's chat role chunk); none by default.
    fn opening(&mut self) -> String {
        String::new()
    }
    /// The text of the newest token(s), with their log-probabilities when the request asked
    /// for them (then `text` may be empty).
    fn token(&mut self, text: &str, logprobs: &[TokenLogprob]) -> String;
    /// The tool calls the answer made (sent once, at the end, before [`Framing::finish`]).
    fn tool_calls(&mut self, calls: &[ToolCall]) -> String;
    /// The end of a successful generation (final usage, terminator).
    fn finish(&mut self, usage: &Usage, reason: StopReason) -> String;
    /// A failure after the stream has started; the stream ends after it.
    fn error(&mut self, error: &ApiError) -> String;
    /// Sent when no bytes went out for the heartbeat interval (queued, reading a long prompt,
    /// or text held back for a tool call or a stop string), so proxies keep the connection
    /// open.
    fn heartbeat(&mut self) -> String {
        sse::heartbeat().to_string()
    }
}

impl Generation {
    /// Waits for the whole generation (or the drain deadline's cut: 503).
    pub async fn collect(mut self) -> Result<Completion, ServerError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let cut = self.drain.cut_signal();
        tokio::pin!(cut);
        loop {
            let event = tokio::select! {
                event = self.stream.next() => event,
                _ = &mut cut => {
                    self.drain.note_cut();
                    return Err(ServerError::Cut);
                }
            };
            match event {
                Some(GenerationEvent::Token {
                    text: t,
                    logprobs: l,
                }) => {
                    self.timer.token();
                    text.push_str(&t);
                    logprobs.extend(l);
                }
                Some(GenerationEvent::PromptProcessed { .. }) => {}
                Some(GenerationEvent::Finished { usage, reason }) => {
                    self.timer.finish();
                    let (text, tool_calls) = match self.tool_calling {
                        Some(calling) => calling.parse(&text),
                        None => (text, Vec::new()),
                    };
                    return Ok(Completion {
                        text,
                        tool_calls,
                        logprobs,
                        usage,
                        reason,
                    });
                }
                Some(GenerationEvent::Failed(e)) => return Err(ServerError::Generation(e)),
                Some(GenerationEvent::FormatUnmet(e)) => return Err(ServerError::FormatUnmet(e)),
                None => {
                    tracing::error!("engine dropped a sequence without finishing it");
                    return Err(ServerError::Engine(edgerun_engine::EngineError::Stopped));
                }
            }
        }
    }

    /// Streams the generation as server-sent events framed by `framing`: each text delta as
    /// soon as the engine sends it, then the framing's end. A failure the engine reports at once
    /// (say the KV cache cannot be allocated) still gets a proper status and JSON envelope: the
    /// headers wait for the first event, at most `FIRST_EVENT_GRACE` (1 s), which delays no token.
    pub async fn stream<F: Framing>(
        mut self,
        framing: F,
        heartbeat: Duration,
    ) -> Result<Response, ServerError> {
        let first = match tokio::time::timeout(FIRST_EVENT_GRACE, self.stream.next()).await {
            Ok(Some(GenerationEvent::Failed(e))) => return Err(ServerError::Generation(e)),
            Ok(Some(GenerationEvent::FormatUnmet(e))) => return Err(ServerError::FormatUnmet(e)),
            Ok(None) => return Err(ServerError::Engine(edgerun_engine::EngineError::Stopped)),
            Ok(Some(event)) => Some(event),
            Err(_) => None,
        };
        Ok(sse_response(self, first, framing, heartbeat))
    }
}

fn sse_response<F: Framing>(
    generation: Generation,
    first: Option<GenerationEvent>,
    mut framing: F,
    heartbeat: Duration,
) -> Response {
    let Generation {
        stream,
        timer,
        drain,
        tool_calling,
    } = generation;
    let opening = framing.opening();
    let end = stream.end();
    let streaming = Streaming {
        end: end.clone(),
        stream,
        pending: first,
        opening,
        timer,
        framing,
        calls: tool_calling.map(|c| c.splitter()),
        cut: Box::pin(drain.cut_signal()),
        drain,
        heartbeat,
    };
    let events = futures::stream::unfold(Some(streaming), |state| async move {
        let mut streaming = state?;
        let (frame, keep) = streaming.next_frame().await;
        let frame = Ok::<_, Infallible>(Bytes::from(frame));
        Some((frame, keep.then_some(streaming)))
    });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(sse::EVENT_STREAM_CONTENT_TYPE),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    // For the connection's watchdog: while the engine holds the sequence, a client that stopped
    // reading is the engine's to time out (it ends the stream with an error event, which the
    // client finds if it reads again), not the write-stall timeout's.
    resp.extensions_mut()
        .insert(crate::serve::StreamLiveness::new(move || !end.is_retired()));
    resp
}

/// A streamed generation between two frames.
struct Streaming<F> {
    stream: Box<dyn Events>,
    /// Whether the engine dropped the sequence for stalling (its `Failed` is then a 408).
    end: Arc<dyn EndState>,
    /// An event read before the headers went out (the first-event grace).
    pending: Option<GenerationEvent>,
    /// The framing's first bytes, sent as soon as the body is.
    opening: String,
    timer: TokenTimer,
    framing: F,
    /// With tools: holds back what may be a call (see [`Framing::tool_calls`]).
    calls: Option<edgerun_engine::ToolCallSplitter>,
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    drain: Arc<Drain>,
    heartbeat: Duration,
}

impl<F: Framing> Streaming<F> {
    /// The next bytes to send, and whether more follow. Called when the body is asked for its
    /// next frame, i.e. once the previous one has gone out: the heartbeat interval counts from
    /// there, so engine events that produce no bytes (text held back for a possible tool call
    /// or stop string, prompt progress) never postpone a keep-alive. A client waiting on a
    /// forced tool call, which is held back whole, thus hears from the node every interval.
    async fn next_frame(&mut self) -> (String, bool) {
        if !self.opening.is_empty() {
            return (std::mem::take(&mut self.opening), true);
        }
        let deadline = tokio::time::Instant::now() + self.heartbeat;
        loop {
            let next = match self.pending.take() {
                Some(event) => Ok(Some(event)),
                None => tokio::select! {
                    next = tokio::time::timeout_at(deadline, self.stream.next()) => next,
                    _ = &mut self.cut => {
                        // The drain deadline: end with an error event, never silently.
                        self.drain.note_cut();
                        return (self.framing.error(&ServerError::Cut.api_error()), false);
                    }
                },
            };
            let (frame, keep) = match next {
                Err(_) => (self.framing.heartbeat(), true),
                Ok(Some(GenerationEvent::PromptProcessed { .. })) => continue,
                Ok(Some(GenerationEvent::Token { text, logprobs })) => {
                    self.timer.token();
                    // With tools, what may be a call is held back until the end.
                    let text = match self.calls.as_mut() {
                        Some(splitter) => splitter.push(&text),
                        None => text,
                    };
                    if text.is_empty() && logprobs.is_empty() {
                        continue;
                    }
                    (self.framing.token(&text, &logprobs), true)
                }
                Ok(Some(GenerationEvent::Finished { usage, reason })) => {
                    self.timer.finish();
                    let mut frame = String::new();
                    if let Some(splitter) = self.calls.take() {
                        let (tail, found) = splitter.finish();
                        if !tail.is_empty() {
                            frame.push_str(&self.framing.token(&tail, &[]));
                        }
                        if !found.is_empty() {
                            frame.push_str(&self.framing.tool_calls(&found));
                        }
                    }
                    frame.push_str(&self.framing.finish(&usage, reason));
                    (frame, false)
                }
                Ok(Some(GenerationEvent::FormatUnmet(e))) => (
                    self.framing.error(&ServerError::FormatUnmet(e).api_error()),
                    false,
                ),
                Ok(Some(GenerationEvent::Failed(e))) => {
                    let e = if self.end.stalled() {
                        ServerError::Stalled(e)
                    } else {
                        ServerError::Generation(e)
                    };
                    (self.framing.error(&e.api_error()), false)
                }
                Ok(None) => {
                    let e = ServerError::Engine(edgerun_engine::EngineError::Stopped);
                    (self.framing.error(&e.api_error()), false)
                }
            };
            // A frame with no bytes (a dialect with nothing to say for an event) is no sign of
            // life: keep waiting, on the same deadline.
            if frame.is_empty() && keep {
                continue;
            }
            return (frame, keep);
        }
    }
}

/// Records time to first token, inter-token latency and request duration as a generation's
/// events go out.
struct TokenTimer {
    started: Instant,
    last: Option<Instant>,
}

impl TokenTimer {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last: None,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => metrics::histogram!(telemetry::TTFT).record((now - self.started).as_secs_f64()),
            Some(prev) => {
                metrics::histogram!(telemetry::INTER_TOKEN).record((now - prev).as_secs_f64())
            }
        }
        self.last = Some(now);
    }

    fn finish(&self) {
        metrics::histogram!(telemetry::REQUEST_DURATION, "outcome" => "ok")
            .record(self.started.elapsed().as_secs_f64());
    }
}
