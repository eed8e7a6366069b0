//! A [`Backend`] without a model, for tests: each request plays a script of events.
//!
//! [`FakeBackend`] answers `reserve` from its script (a queue-full answer is
//! [`Script::busy`]), records what each request prepared and submitted, and streams the script's
//! steps: events ([`Step::Event`]: tokens, prompt progress, `Finished`, `Failed`,
//! `FormatUnmet`), pauses ([`Step::Pause`]: a stall the server's heartbeats must cover), or the
//! backend letting the generation go without a last event ([`Step::Hang`] waits forever). The
//! events are [`GenerationEvent`]s, the type the engine's `TokenStream` yields, so the server's
//! framing, heartbeats and error mapping run exactly as over the engine. Whether the reader
//! dropped its stream (a client that hung up cancels) is visible through
//! [`FakeBackend::cancelled`].

use crate::backend::{Backend, EndState, Events, Reservation, Submission};
use edgerun_engine::{
    EngineError, GenerationEvent, GrammarLimits, Health, OutputFormat, PromptInput, QueuePolicy,
    SamplingConfig, StatsSnapshot, StopCriteria, StopReason, TokenLogprob, Tool, ToolCallFormat,
    ToolCalling, Usage,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// One step of a script.
#[derive(Debug, Clone)]
pub enum Step {
    Event(GenerationEvent),
    /// Nothing for this long (a queued request, a long prompt, a slow step).
    Pause(Duration),
    /// Nothing ever again (until the reader drops the stream).
    Hang,
    /// The backend drops the generation because its reader stopped reading: marked stalled,
    /// then this `Failed` message.
    Stalled(String),
}

/// What every request to a [`FakeBackend`] gets.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Answer `reserve` with this error (`Busy`: the queue is full).
    pub reserve: Option<fn() -> EngineError>,
    /// Answer `prepare` with this error (a bad schema: `InvalidFormat`).
    pub prepare: Option<fn() -> EngineError>,
    /// Answer `submit` with this error (past the context window).
    pub submit: Option<fn() -> EngineError>,
    pub steps: Vec<Step>,
    /// The model's tool-call family (Hermes by default).
    pub tool_calling: Option<ToolCalling>,
}

impl Script {
    /// Streams `tokens` then finishes (`EndOfTurn`) with matching usage.
    pub fn tokens(tokens: &[&str]) -> Self {
        let mut steps = vec![Step::Event(GenerationEvent::PromptProcessed {
            prompt_tokens: 5,
        })];
        steps.extend(tokens.iter().map(|t| Step::Event(token(t))));
        steps.push(Step::Event(GenerationEvent::Finished {
            usage: Usage {
                prompt_tokens: 5,
                completion_tokens: tokens.len(),
                cached_tokens: 0,
            },
            reason: StopReason::EndOfTurn,
        }));
        Self {
            steps,
            ..Self::default()
        }
    }

    /// The queue is full.
    pub fn busy() -> Self {
        Self {
            reserve: Some(|| EngineError::Busy),
            ..Self::default()
        }
    }

    /// The given steps, as they are.
    pub fn steps(steps: Vec<Step>) -> Self {
        Self {
            steps,
            ..Self::default()
        }
    }
}

/// A token event with no log-probabilities.
pub fn token(text: &str) -> GenerationEvent {
    GenerationEvent::Token {
        text: text.to_string(),
        logprobs: Vec::<TokenLogprob>::new(),
    }
}

/// What a request handed the fake.
#[derive(Debug, Clone)]
pub struct Seen {
    pub policy: QueuePolicy,
    pub prompt: Option<PromptInput>,
    pub tools: Vec<Tool>,
    pub format: Option<OutputFormat>,
    pub sampling: Option<SamplingConfig>,
    pub stopping: Option<StopCriteria>,
}

/// A backend that plays a [`Script`] for every request.
#[derive(Clone)]
pub struct FakeBackend {
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
    cancelled: Arc<AtomicUsize>,
    health: Arc<Mutex<Health>>,
}

impl FakeBackend {
    pub fn new(script: Script) -> Self {
        Self {
            script: Arc::new(script),
            seen: Arc::default(),
            cancelled: Arc::default(),
            health: Arc::new(Mutex::new(Health::Ready)),
        }
    }

    /// What each request handed over so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Streams dropped before their script ended (a client that hung up).
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub fn set_health(&self, health: Health) {
        *self.health.lock().unwrap() = health;
    }
}

impl Backend for FakeBackend {
    fn reserve(&self, policy: QueuePolicy) -> Result<Box<dyn Reservation>, EngineError> {
        if let Some(e) = &self.script.reserve {
            return Err(e());
        }
        let mut seen = self.seen.lock().unwrap();
        seen.push(Seen {
            policy,
            prompt: None,
            tools: Vec::new(),
            format: None,
            sampling: None,
            stopping: None,
        });
        Ok(Box::new(FakeStage {
            fake: self.clone(),
            index: seen.len() - 1,
        }))
    }
    fn tool_calling(&self) -> ToolCalling {
        self.script.tool_calling.unwrap_or(ToolCalling {
            format: ToolCallFormat::Hermes,
            native: true,
        })
    }
    fn health(&self) -> Health {
        self.health.lock().unwrap().clone()
    }
    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }
    fn context_window(&self) -> usize {
        4096
    }
}

/// A reserved, then prepared, request of the fake.
struct FakeStage {
    fake: FakeBackend,
    index: usize,
}

impl Reservation for FakeStage {
    fn prepare(
        self: Box<Self>,
        prompt: &PromptInput,
        tools: &[Tool],
        format: &OutputFormat,
        _limits: &GrammarLimits,
    ) -> Result<Box<dyn Submission>, EngineError> {
        {
            let mut seen = self.fake.seen.lock().unwrap();
            let s = &mut seen[self.index];
            s.prompt = Some(prompt.clone());
            s.tools = tools.to_vec();
            s.format = Some(format.clone());
        }
        match &self.fake.script.prepare {
            Some(e) => Err(e()),
            None => Ok(self),
        }
    }
}

impl Submission for FakeStage {
    fn submit(
        self: Box<Self>,
        sampling: SamplingConfig,
        stopping: StopCriteria,
    ) -> Result<Box<dyn Events>, EngineError> {
        {
            let mut seen = self.fake.seen.lock().unwrap();
            let s = &mut seen[self.index];
            s.sampling = Some(sampling);
            s.stopping = Some(stopping);
        }
        if let Some(e) = &self.fake.script.submit {
            return Err(e());
        }
        Ok(Box::new(FakeEvents {
            steps: self.fake.script.steps.clone().into(),
            sleep: None,
            end: Arc::new(FakeEnd::default()),
            cancelled: self.fake.cancelled.clone(),
        }))
    }
}

#[derive(Default)]
struct FakeEnd {
    retired: AtomicBool,
    stalled: AtomicBool,
}

impl EndState for FakeEnd {
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }
    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }
}

struct FakeEvents {
    steps: std::collections::VecDeque<Step>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    end: Arc<FakeEnd>,
    cancelled: Arc<AtomicUsize>,
}

impl Drop for FakeEvents {
    fn drop(&mut self) {
        if !self.end.is_retired() {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl futures::Stream for FakeEvents {
    type Item = GenerationEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.steps.pop_front() {
                None => {
                    self.end.retired.store(true, Ordering::SeqCst);
                    return Poll::Ready(None);
                }
                Some(Step::Hang) => {
                    self.steps.push_front(Step::Hang);
                    return Poll::Pending;
                }
                Some(Step::Stalled(why)) => {
                    self.end.stalled.store(true, Ordering::SeqCst);
                    self.end.retired.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(GenerationEvent::Failed(why)));
                }
                Some(Step::Pause(d)) => self.sleep = Some(Box::pin(tokio::time::sleep(d))),
                Some(Step::Event(event)) => {
                    if matches!(
                        event,
                        GenerationEvent::Finished { .. }
                            | GenerationEvent::Failed(_)
                            | GenerationEvent::FormatUnmet(_)
                    ) {
                        self.end.retired.store(true, Ordering::SeqCst);
                    }
                    return Poll::Ready(Some(event));
                }
            }
        }
    }
}

impl Events for FakeEvents {
    fn end(&self) -> Arc<dyn EndState> {
        self.end.clone()
    }
}
