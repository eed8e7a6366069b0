//! # edgerun-engine
//!
//! Owns everything between a validated request and a stream of text: the GGUF model and its
//! forward pass, the tokenizer, the chat template, sampling, and the scheduler that batches
//! sequences together.
//!
//! ## Data flow
//!
//! ```text
//! PromptInput ──Engine::prepare──▶ prompt tokens        (caller's thread: template + tokenize)
//!   tokens + SamplingParams ──Engine::submit──▶ channel ──▶ engine thread
//!   engine thread, each step:
//!     admit waiting sequences (KvCache allocated at prompt + max_tokens)
//!     drop sequences whose TokenStream was dropped
//!     one LlamaModel::forward over every running sequence:
//!        decoding sequences give one token, prefilling ones a prompt chunk
//!     sample per sequence, detokenize incrementally, send GenerationEvents
//!   TokenStream ◀── Token / Finished / Failed
//! ```
//!
//! One OS thread owns the model. Callers talk to it only through channels, so an async server
//! never blocks on inference; the engine never blocks on a caller either (event channels are
//! unbounded and each send is a few bytes of text).
//!
//! ## Invariants
//!
//! * Each sequence owns its [`KvCache`]; the model holds no per-request state.
//! * Every weight is applied once per step for the whole batch (one quantized matmul over the
//!   concatenated tokens of all sequences); only attention is per sequence.
//! * A dropped [`TokenStream`] cancels its sequence before the next step, including while its
//!   prompt is still being read.
//! * A sequence's output depends only on its prompt, parameters and seed, never on what else
//!   is in the batch.
//!
//! ## Must never
//!
//! * block or panic on the caller's thread because of a bad request: bad input is an
//!   [`EngineError`] from [`Engine::prepare`] / [`Engine::submit`];
//! * let one sequence's failure take down the others or the engine thread (a panic inside a
//!   step fails that step's sequences and the loop goes on);
//! * cap positions below the model's context length.

mod config;
mod error;
pub mod kernels;
mod kv_cache;
mod model;
mod sampling;
mod scheduler;
mod template;
mod tokenizer;

pub use config::ModelConfig;
pub use edgerun_protocol::{ChatMessage, PromptInput, SamplingParams, Usage};
pub use error::{EngineError, Result};
pub use kv_cache::KvCache;
pub use model::{Kernels, LlamaModel, Segment};
pub use sampling::{argmax, Sampler};
pub use scheduler::{
    EngineStats, FinishReason, GenerationEvent, SchedulerConfig, StatsSnapshot, TokenStream,
};
pub use template::{ChatTemplate, CHATML_TEMPLATE};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};

use candle_core::quantized::gguf_file;
use candle_core::Device;
pub use scheduler::kv_bytes_per_token;
use scheduler::{check_context, token_channel, Scheduler, Submission};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

/// Where the model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 or Metal when compiled in and present, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}` (expected auto, cpu, cuda:N or metal)")
                }),
        }
    }
}

impl DeviceSpec {
    pub fn open(&self) -> Result<Device> {
        let err = |e: candle_core::Error| EngineError::Load(format!("device {self:?}: {e}"));
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(*n).map_err(err),
            Self::Metal => Device::new_metal(0).map_err(err),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).map_err(err)
                } else if candle_core::utils::metal_is_available() {
                    Device::new_metal(0).map_err(err)
                } else {
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// A model with everything needed to turn requests into tokens.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
}

impl LoadedModel {
    /// Loads a llama GGUF: weights, tokenizer (from the metadata unless `tokenizer_json` is
    /// given) and chat template (from the metadata, ChatML when it has none).
    pub fn load(path: &Path, tokenizer_json: Option<&Path>, device: &Device) -> Result<Self> {
        Self::load_with(path, tokenizer_json, device, Kernels::Fastest)
    }

    /// [`LoadedModel::load`] with a choice of matmul kernels.
    pub fn load_with(
        path: &Path,
        tokenizer_json: Option<&Path>,
        device: &Device,
        kernels: Kernels,
    ) -> Result<Self> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Load(format!("{}: not a GGUF file: {e}", path.display())))?;
        let model = LlamaModel::from_gguf(&ct, &mut file, device, kernels)?;
        let tokenizer = match tokenizer_json {
            Some(p) => TextTokenizer::from_file(p, &ct)?,
            None => TextTokenizer::from_gguf(&ct)?,
        };
        let source = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        if source.is_none() {
            tracing::warn!("the GGUF has no tokenizer.chat_template; using ChatML");
        }
        let template = ChatTemplate::new(
            source.as_deref().unwrap_or(CHATML_TEMPLATE),
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )?;
        Ok(Self {
            model,
            tokenizer,
            template,
        })
    }
}

/// A handle to the engine thread. Cheap to clone; the thread stops when the last handle is
/// dropped and its running sequences are finished or cancelled.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Submission>,
    model: Arc<LlamaModel>,
    tokenizer: Arc<TextTokenizer>,
    template: Arc<ChatTemplate>,
    stats: Arc<EngineStats>,
    config: SchedulerConfig,
    context_window: usize,
}

impl Engine {
    /// Starts the engine thread, runs one warm-up step, and returns once it is ready.
    /// `context_window` caps the model's own context length (for example Workers AI's 7968 for
    /// llama-3-8b-instruct); `None` uses the model's.
    pub fn start(
        loaded: LoadedModel,
        config: SchedulerConfig,
        context_window: Option<usize>,
    ) -> Result<Self> {
        let LoadedModel {
            model,
            tokenizer,
            template,
        } = loaded;
        let model_ctx = model.config().context_length;
        let context_window = context_window.map_or(model_ctx, |w| w.min(model_ctx));
        let model = Arc::new(model);
        let tokenizer = Arc::new(tokenizer);
        let stats = Arc::new(EngineStats::default());
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler {
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            config,
            stats: stats.clone(),
            rx,
        };
        std::thread::Builder::new()
            .name("edgerun-engine".into())
            .spawn(move || scheduler.run())
            .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
        let engine = Self {
            tx,
            model,
            tokenizer,
            template: Arc::new(template),
            stats,
            config,
            context_window,
        };
        engine.warm_up()?;
        if !engine.stats.stopped.load(Ordering::Relaxed) {
            engine.stats.ready.store(true, Ordering::Relaxed);
        }
        Ok(engine)
    }

    fn warm_up(&self) -> Result<()> {
        let prompt = self.tokenizer.encode("Hello")?;
        let params = SamplingParams {
            max_tokens: 2,
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let mut stream = self.submit(prompt, params, false)?;
        while let Some(ev) = stream.blocking_recv() {
            match ev {
                GenerationEvent::Finished { .. } => return Ok(()),
                GenerationEvent::Failed(e) => {
                    return Err(EngineError::Load(format!("warm-up failed: {e}")))
                }
                _ => {}
            }
        }
        Err(EngineError::Stopped)
    }

    /// Applies the chat template and tokenizes. CPU work proportional to the prompt: call it
    /// off the async runtime's workers.
    pub fn prepare(
        &self,
        input: &PromptInput,
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let text = self.template.render_input(input, tools)?;
        let tokens = self.tokenizer.encode(&text)?;
        if tokens.is_empty() {
            return Err(EngineError::Tokenizer(
                "the prompt is empty after tokenization".into(),
            ));
        }
        Ok(tokens)
    }

    /// Queues a generation. Fails at once (never blocks) when the prompt does not fit, when the
    /// queue is full, or when `reject_if_busy` is set and no batch slot is free.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        reject_if_busy: bool,
    ) -> Result<TokenStream> {
        check_context(
            prompt.len(),
            params.max_tokens as usize,
            self.context_window,
        )?;
        if let Some(budget) = self.config.kv_cache_budget {
            let positions =
                (prompt.len() + params.max_tokens as usize).min(self.model.config().context_length);
            let needed = positions * kv_bytes_per_token(self.model.config(), self.model.dtype());
            if needed > budget {
                return Err(EngineError::KvCacheBudgetExceeded {
                    prompt_tokens: prompt.len(),
                    max_tokens: params.max_tokens as usize,
                    needed_mib: needed.div_ceil(1 << 20),
                    budget_mib: budget >> 20,
                });
            }
        }
        // Sequences in flight (running or waiting) may not exceed the batch plus the queue;
        // `reject_if_busy` (Workers AI's `options.rejectIfBusy`) refuses to wait at all.
        let in_flight =
            self.stats.queued.load(Ordering::Relaxed) + self.stats.active.load(Ordering::Relaxed);
        let limit = if reject_if_busy {
            self.config.max_batch_size
        } else {
            self.config.max_batch_size + self.config.max_queue
        };
        if in_flight >= limit {
            return Err(EngineError::Busy);
        }
        let (tx, stream) = token_channel();
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(Submission { prompt, params, tx }).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        Ok(stream)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Loaded, warmed up, and its thread still running.
    pub fn is_ready(&self) -> bool {
        self.stats.ready.load(Ordering::Relaxed) && !self.stats.stopped.load(Ordering::Relaxed)
    }

    /// Prompt plus `max_tokens` may not exceed this.
    pub fn context_window(&self) -> usize {
        self.context_window
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }
}
