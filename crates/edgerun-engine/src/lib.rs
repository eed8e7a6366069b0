//! # edgerun-engine
//!
//! Owns everything between a resolved request and a stream of text: the GGUF model and its
//! forward pass, the kernels, the tokenizer, the chat template, sampling, and the scheduler
//! that batches sequences together. It knows no HTTP and no API dialect (it does not depend on
//! `edgerun-protocol`): the server turns each dialect's wire request into the engine's own
//! [`PromptInput`] and [`GenerationRequest`], every default resolved.
//!
//! ## Where things live
//!
//! | kind of change | its home |
//! |---|---|
//! | a model architecture | `models/<arch>.rs`, one [`CausalLm`] impl, one line in [`models::ARCHITECTURES`] |
//! | a block format or a device kernel | `kernels/<format>.rs`, one arm in [`kernels::QLinear::new`] |
//! | a stop rule | on ids: a method of `Sequence` (`sequence.rs`), its parameter in [`StopCriteria`]; on text: the reader's side, `output.rs` (stop strings: `output/stop.rs`) |
//! | a sampling parameter | a field of [`SamplingConfig`], applied in [`Sampler`] (host) and [`DeviceSampler`] (where the logits are; `sampling/device.rs`), held to each other by their tests |
//! | an output format (JSON schema, Lark grammar) | an [`OutputFormat`] variant, compiled by llguidance in `constraint.rs` ([`Engine::constrain`]) |
//! | a tool-call family | `tools.rs`: [`ToolCalling::detect`], its parser and its forcing grammar (a tool's schema hoisted into it: `tools/hoist.rs`) |
//! | something reported per token | computed on the engine thread into the engine's `Emitted::Token`, made readable by the [`TokenStream`] into a field of the `Token` event ([`GenerationEvent`], `output.rs`); log-probabilities: [`Logprobs`] in [`SamplingConfig`], computed by `Sequence::sample` ([`step_logprobs`]), their tokens' bytes added by the stream |
//! | how steps are composed | `scheduler/plan.rs` (pure) and `scheduler/admission.rs` (pure) |
//! | a scheduler setting, its default and validation | `scheduler/config.rs` ([`SchedulerConfig`]) |
//! | a counter, a stat or the health rule | `scheduler/stats.rs` ([`EngineStats`], [`StatsSnapshot`], [`Health`]) |
//! | how a step runs the model, device sampling, host sampling | `scheduler/runner.rs` |
//! | admission, preemption, retiring, fault isolation (the loop) | `scheduler/mod.rs` |
//! | whether a machine runs this build (driver, compute capability), opening a device, sizing its memory | `device/` (`preflight.rs`, `memory.rs`) |
//! | checking a device against the CPU (`edgerun check-device`, `scripts/gpu-check.sh`) | `device_check.rs` |
//! | a quantization layout or a generated shape | `gguf/layout.rs` (llama-quantize's rules), `gguf/mod.rs` (`SHAPES`) |
//! | a tokenizer kind or a BPE pre-tokenizer | `tokenizer/` (`mod.rs`: byte-level BPE over the `tokenizers` crate, the pre-tokenizer table by `tokenizer.ggml.pre`; `spm.rs`: SentencePiece), held to llama.cpp's vocabulary vectors by the engine test `vocab_vectors` |
//! | how a chat template is rendered (a Jinja2 behaviour) | `template.rs`, held to Jinja2's renders of llama.cpp's 70 templates by the engine test `templates` |
//! | an embedding model's architecture (an encoder) | `models/bert/`: `mod.rs` the config, loading and candle's forward over a padded batch (GPUs, other CPUs); `cpu.rs` the x86 CPU's (AVX-512 or AVX2) forward over packed texts |
//! | how embedding requests are batched, pooled and bounded | `embedding.rs` ([`Embedder`]: a thread of its own per embedding model, apart from the generation scheduler) |
//!
//! ## Data flow
//!
//! ```text
//! PromptInput (+ tools) ──Engine::prepare──▶ prompt tokens   (caller's thread: template + tokenize)
//! OutputFormat ──Engine::constrain──▶ Constraint         (caller's thread: schema → grammar, first mask)
//! GenerationRequest { prompt, sampling, stopping, constraint } ──Engine::submit──▶ channel ──▶ engine thread
//!   engine thread, each turn:
//!     take submissions, drop cancelled sequences
//!     admit from the queue (admission: batch slots, KV budget, first come first served);
//!       each admitted request becomes a Sequence with its KvCache (prompt + max_tokens):
//!       its own buffers (contiguous, the CPU's) or blocks of the engine's KvPool (paged, GPUs')
//!     plan_step: Decode for decoding sequences, Prefill { start, len } prompt chunks; paged:
//!       each planned sequence takes the blocks its step needs, oldest first, and the newest is
//!       preempted (blocks back, its context read again later) when the pool runs out
//!     execute: one CausalLm::forward over every planned segment; the token masks of the
//!       constrained sequences about to sample are computed on a side thread meanwhile
//!     update_from_output: sample per sequence (its format's mask applied first; with its
//!       log-probabilities, when asked for; paged: every sequence without a format is sampled
//!       for the whole batch on the device by DeviceSampler and only ids (and the few
//!       log-probabilities asked for) are copied back, with the uniform each sequence's own
//!       generator drew); Sequence::accept feeds the grammar,
//!       applies the stop rules on ids (end of turn, a complete format, max_tokens, context),
//!       sends the token's id (and log-probabilities); finished sequences leave the batch;
//!       sequences whose readers found a stop string are retired before the next step
//!   channel ◀── ids: PromptProcessed / Token { id, logprobs } / Finished { usage, reason } / Failed
//!   TokenStream (the reader's thread, output.rs): detokenizes, applies stop strings (a match
//!     raises a flag the engine reads, as it notices a dropped stream), adds tokens' bytes
//!     ──▶ PromptProcessed / Token { text, logprobs } / Finished { usage, StopReason } / Failed
//! ```
//!
//! One OS thread owns the model (on the CPU it is also worker 0 of a rayon pool of its own, so
//! candle-nn's parallel ops run on it instead of crossing threads). Callers talk to it only
//! through channels, so an async server never blocks on inference; the engine never blocks on a caller either: each sequence's event
//! channel is bounded, a sequence whose reader falls behind is paused (left out of steps) and,
//! after [`SchedulerConfig::stalled_stream_timeout`], dropped.
//!
//! Admission happens in stages so that refusing costs nothing, and the types fix their order:
//! [`Engine::reserve`] takes a place in the queue (or answers `Busy`) before the prompt is
//! templated and tokenized, giving a [`Reserved`]; [`Reserved::prepare`] templates, tokenizes
//! and compiles the output format, giving a [`Prepared`]; [`Prepared::submit`] hands it over
//! in that place, giving the [`TokenStream`].
//!
//! ## Invariants
//!
//! * Each sequence owns its [`KvCache`] (its buffers, or its blocks of the engine's [`KvPool`],
//!   given back when it is dropped, before its last event is sent); the model holds no
//!   per-request state.
//! * The engine thread never touches text: it sends ids, and each stream's reader turns them
//!   into text (`output.rs`), so on a GPU the thread goes back to the next step at once and the
//!   text work of many streams runs on the server's threads, beside the device.
//! * On a GPU a step's device work per layer does not grow with the batch: with paged caches
//!   all keys and values are written with one scatter and all decoding sequences attend in one
//!   batched attention over one gather (`models/attention.rs`).
//! * Every weight is applied once per step for the whole batch (one quantized matmul over the
//!   concatenated tokens of all sequences); only attention is per sequence.
//! * A dropped [`TokenStream`] cancels its sequence before the next step, including while its
//!   prompt is still being read.
//! * A sequence's output depends only on its prompt, parameters and seed, never on what else
//!   is in the batch, on the CPU with contiguous caches (its default). This rests on the
//!   matmul kernels being bitwise row-invariant, and on attention running per sequence: ours are
//!   (Q4_1, Q8_0, Q4_K, Q5_K, Q6_K on the CPU: every tensor of the `Q4_K_M`, `Q5_K_M`,
//!   `Q6_K`, `Q8_0` and `Q4_1` files llama-quantize writes for 256-multiple rows); formats
//!   served by candle's kernels (Q4_0, Q5_0, Q5_1, and every GPU kernel) do not promise it
//!   (`tests/engine/kquants.rs` shows candle's Q6_K breaking it), nor does paged storage's batched
//!   attention (padding to the batch's longest history changes the length of its sums):
//!   there, outputs agree with a sequence alone but at near ties (`tests/engine/paged.rs`).
//! * A constrained sequence never holds the batch back by more than its mask's excess over the
//!   forward pass: masks depend only on tokens already consumed and are computed beside it.
//! * Tool calls are read from text only after generation (or held back while streaming, by the
//!   server with [`ToolCallSplitter`]); the engine's events are always plain text.
//! * Nothing on the hot path is optional: [`SamplingConfig`] and [`StopCriteria`] arrive
//!   resolved, [`SchedulerConfig`] arrives validated.
//!
//! ## Must never
//!
//! * block or panic on the caller's thread because of a bad request: bad input is an
//!   [`EngineError`] from [`Engine::prepare`] / [`Engine::submit`];
//! * let one sequence's failure take down the others or the engine thread: a step that fails
//!   is retried per sequence and fails only the sequences that fail alone; repeated device
//!   failures show in [`Engine::health`] (see `scheduler`'s docs);
//! * cap positions below the model's context length;
//! * load a model leniently: a tensor or metadata key that is present but unreadable is an
//!   error naming it, never a silent default.

mod constraint;
pub mod device;
pub mod device_check;
pub mod embedding;
mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod gguf;
pub mod kernels;
mod kv_cache;
pub mod models;
mod output;
mod request;
mod sampling;
mod scheduler;
mod sequence;
mod template;
mod tokenizer;
mod tools;

pub use constraint::{Constraint, GrammarCompiler, GrammarLimits, OutputFormat};
pub use device::memory::{gpu_kv_budget, ActivationEstimate, StepLimits};
pub use device::{device_memory, DeviceSpec};
pub use embedding::{
    EmbedInput, EmbedStats, EmbedTicket, Embedder, EmbedderInfo, EmbeddingConfig, EmbeddingModel,
    Pooling,
};
pub use error::{EngineError, Result};
pub use kernels::Kernels;
pub use kv_cache::prefix::{BlockHash, PrefixAllocator, PrefixStats};
pub use kv_cache::{KvCache, KvLayout, KvPool, KvStorage};
pub use models::{CausalLm, ModelConfig, Segment};
pub use output::{GenerationEvent, SequenceEnd, TokenStream, EVENT_BUFFER};
pub use request::{
    ChatMessage, GenerationRequest, LogprobEntry, Logprobs, PromptInput, QueuePolicy,
    SamplingConfig, StopCriteria, StopReason, TokenLogprob, Usage,
};
pub use sampling::{
    argmax, argmax_weights, device_argmax, step_logprobs, DeviceRow, DeviceSampler, Penalty,
    Sampler, StepLogprobs, MIN_LOGPROB,
};
pub use scheduler::admission::KvReservation;
pub use scheduler::plan::{plan_step, Planned, SeqProgress, Work};
pub use scheduler::{
    EngineStats, Health, SchedulerConfig, StatsSnapshot, FAILING_AFTER, IDLE_PROBE,
};
pub use template::{ChatTemplate, CHATML_TEMPLATE};
pub use tokenizer::{IncrementalDecoder, TextTokenizer};
pub use tools::{Tool, ToolCall, ToolCallFormat, ToolCallSplitter, ToolCalling, ToolChoice};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use scheduler::{admission, check_context, Scheduler, Submission};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

/// A model with everything needed to turn requests into tokens.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
}

impl LoadedModel {
    /// Loads a GGUF: weights (the architecture chosen by `general.architecture`), tokenizer
    /// (from the metadata unless `tokenizer_json` is given) and chat template (from the
    /// metadata, ChatML when it has none).
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
        let model = models::load(&ct, &mut file, device, kernels)?;
        let tokenizer = match tokenizer_json {
            Some(p) => TextTokenizer::from_file(p, &ct)?,
            None => TextTokenizer::from_gguf(&ct)?,
        };
        let source = ct
            .metadata
            .get("tokenizer.chat_template")
            .map(|v| {
                v.to_string().cloned().map_err(|e| {
                    EngineError::Load(format!("`tokenizer.chat_template` is not a string: {e}"))
                })
            })
            .transpose()?;
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
    model: Arc<dyn CausalLm>,
    tokenizer: Arc<TextTokenizer>,
    template: Arc<ChatTemplate>,
    /// Built on first use (a 128k vocabulary's token trie costs tens of milliseconds).
    grammars: Arc<std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>>,
    stop_ids: Arc<std::collections::BTreeSet<u32>>,
    stats: Arc<EngineStats>,
    config: SchedulerConfig,
    context_window: usize,
    #[cfg(feature = "fault-injection")]
    faults: Arc<std::sync::Mutex<faults::Faults>>,
}

/// A place in the engine's queue, taken by [`Engine::reserve`]: the first state of a request's
/// way in. The types fix the order: only a `Reserved` can be [`Reserved::prepare`]d, and only
/// what that returns ([`Prepared`]) can be [`Prepared::submit`]ted, so no prompt is templated
/// before it has a place and nothing unprepared reaches the queue. Dropping either unused gives
/// the place back.
pub struct Reserved {
    engine: Engine,
    slot: QueueSlot,
}

/// A reserved request whose prompt is templated and tokenized and whose output format is
/// compiled ([`Reserved::prepare`]), ready for [`Prepared::submit`].
pub struct Prepared {
    engine: Engine,
    slot: QueueSlot,
    prompt: Vec<u32>,
    constraint: Constraint,
}

impl Reserved {
    /// Templates and tokenizes `input` with `tools` ([`Engine::prepare`]) and compiles `format`
    /// within `limits` ([`Engine::constrain_within`]). Blocks (CPU work proportional to the
    /// prompt and the schema): call it off the async runtime's workers. On an error the place
    /// is given back.
    pub fn prepare(
        self,
        input: &PromptInput,
        tools: &[Tool],
        format: &OutputFormat,
        limits: &GrammarLimits,
    ) -> Result<Prepared> {
        let prompt = self.engine.prepare(input, tools)?;
        let constraint = self.engine.constrain_within(format, limits)?;
        Ok(Prepared {
            engine: self.engine,
            slot: self.slot,
            prompt,
            constraint,
        })
    }
}

impl Prepared {
    /// The prompt's token ids.
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Queues the generation in its place. Fails at once (never blocks) when the request is
    /// malformed, or when the prompt does not fit the context window or could never fit the KV
    /// budget; the place is given back then.
    pub fn submit(self, sampling: SamplingConfig, stopping: StopCriteria) -> Result<TokenStream> {
        let request = GenerationRequest {
            prompt: self.prompt,
            sampling,
            stopping,
            constraint: self.constraint,
        };
        self.engine.submit_reserved(request, self.slot)
    }
}

/// The queue place a [`Reserved`] or [`Prepared`] holds; dropping it unused gives it back.
struct QueueSlot {
    stats: Arc<EngineStats>,
    held: bool,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        if self.held {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs the engine loop on this thread as worker 0 of a rayon pool of its own.
///
/// candle-nn's CPU ops (rms_norm, rope, softmax) parallelize on the calling thread's rayon
/// pool. Called from a thread outside any pool, each one is handed to another thread and
/// waited for: about 150 round trips per decode step on a 30-layer model (~110 context switches
/// per token measured on SmolLM2, ~3,200 instead of ~69,000 over a 600-token run here). As a
/// worker of its own pool, the engine thread runs them itself and the pool's other threads
/// only steal halves of big ones (prefill). The pool has candle's thread count (the server
/// sets it from `--threads`); if it cannot be built, the loop runs as before.
fn run_on_own_pool(scheduler: Scheduler) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .use_current_thread()
        .thread_name(|i| format!("edgerun-rayon-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(|| scheduler.run()),
        Err(e) => {
            tracing::warn!(error = %e, "no rayon pool for the engine thread; running without one");
            scheduler.run()
        }
    }
}

impl Engine {
    /// Starts the engine thread, runs one warm-up step, and returns once it is ready.
    /// `context_window` narrows the model's own context length (for example Workers AI's 7968
    /// for llama-3-8b-instruct); `None` uses the model's. An invalid `config`, or a window
    /// beyond the model's, is refused.
    pub fn start(
        loaded: LoadedModel,
        config: SchedulerConfig,
        context_window: Option<usize>,
    ) -> Result<Self> {
        config.validate()?;
        let LoadedModel {
            model,
            tokenizer,
            template,
        } = loaded;
        let model_ctx = model.config().context_length;
        let context_window = match context_window {
            None => model_ctx,
            Some(w) if (1..=model_ctx).contains(&w) => w,
            Some(w) => {
                return Err(EngineError::Config(format!(
                "context window {w} must be between 1 and the model's context length {model_ctx}"
            )))
            }
        };
        let model: Arc<dyn CausalLm> = Arc::from(model);
        let stop_ids = Arc::new(tokenizer.stop_ids().clone());
        let tokenizer = Arc::new(tokenizer);
        // A paged pool is allocated whole, now: a budget the device cannot hold fails here, at
        // start-up, not under load.
        let pool = match (config.kv_storage, config.kv_cache_budget) {
            (KvStorage::Paged { block_size }, Some(budget)) => {
                let layout = model.kv_layout();
                let blocks = KvPool::blocks_in(&layout, block_size, budget);
                let pool = KvPool::new(&layout, blocks, block_size, model.device())
                    // Whole blocks: on the CPU a row's keys and values do not depend on the
                    // chunk or batch they were computed in (row-invariant kernels and
                    // attention), so a hit of any length changes nothing.
                    .map(|pool| pool.with_prefix_caching(config.prefix_caching, block_size))
                    .map_err(|e| {
                        EngineError::Config(format!(
                        "cannot allocate a KV pool of {blocks} blocks of {block_size} positions \
                         ({} MiB budget): {e}",
                        budget >> 20
                    ))
                    })?;
                tracing::info!(
                    blocks,
                    block_size,
                    positions = blocks * block_size,
                    mib = layout.bytes_for(blocks * block_size) >> 20,
                    dtype = ?layout.dtype,
                    "paged KV pool allocated"
                );
                Some(pool)
            }
            _ => None,
        };
        // The weights and the zeroed pool were queued on this thread's CUDA stream (candle's
        // per-thread default stream) and the engine thread runs on its own: wait for them here,
        // before its first step can read them.
        model
            .device()
            .synchronize()
            .map_err(|e| EngineError::Load(format!("waiting for the device after loading: {e}")))?;
        let stats = Arc::new(EngineStats {
            pool: pool.clone(),
            device_baseline: device_memory(model.device()).map(|(free, total)| total - free),
            ..EngineStats::default()
        });
        let (tx, rx) = mpsc::channel();
        #[cfg(feature = "fault-injection")]
        let faults = Arc::new(std::sync::Mutex::new(faults::Faults::default()));
        let scheduler = Scheduler {
            pool,
            model: model.clone(),
            stop_ids: stop_ids.clone(),
            config,
            stats: stats.clone(),
            rx,
            #[cfg(feature = "fault-injection")]
            faults: faults.clone(),
        };
        std::thread::Builder::new()
            .name("edgerun-engine".into())
            .spawn(move || run_on_own_pool(scheduler))
            .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
        let engine = Self {
            tx,
            model,
            tokenizer,
            template: Arc::new(template),
            grammars: Arc::default(),
            stop_ids,
            stats,
            config,
            context_window,
            #[cfg(feature = "fault-injection")]
            faults,
        };
        engine.warm_up()?;
        if !engine.stats.stopped.load(Ordering::Relaxed) {
            engine.stats.ready.store(true, Ordering::Relaxed);
        }
        Ok(engine)
    }

    fn warm_up(&self) -> Result<()> {
        let request = GenerationRequest::new(
            self.tokenizer.encode("Hello")?,
            SamplingConfig::GREEDY,
            StopCriteria::max_tokens(2),
        );
        let mut stream = self.submit(request, QueuePolicy::Wait)?;
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
    pub fn prepare(&self, input: &PromptInput, tools: &[Tool]) -> Result<Vec<u32>> {
        let text = self.template.render_with_tools(input, tools)?;
        let tokens = self.tokenizer.encode(&text)?;
        if tokens.is_empty() {
            return Err(EngineError::Tokenizer(
                "the prompt is empty after tokenization".into(),
            ));
        }
        Ok(tokens)
    }

    /// Compiles an output format for [`GenerationRequest::constraint`] within
    /// [`GrammarLimits::DEFAULT`]: see [`Engine::constrain_within`].
    pub fn constrain(&self, format: &OutputFormat) -> Result<Constraint> {
        self.constrain_within(format, &GrammarLimits::DEFAULT)
    }

    /// Compiles an output format for [`GenerationRequest::constraint`], on a thread of its own
    /// whose stack is sized by `limits` and within its time budget (`constraint.rs`): a JSON
    /// schema or grammar llguidance cannot compile is [`EngineError::InvalidFormat`], one over
    /// the budget [`EngineError::FormatLimit`]. Blocks (the first call also builds the
    /// vocabulary's token trie): call it off the async runtime's workers.
    pub fn constrain_within(
        &self,
        format: &OutputFormat,
        limits: &GrammarLimits,
    ) -> Result<Constraint> {
        if *format == OutputFormat::Text {
            return Ok(Constraint::Free);
        }
        let compiler = self.grammars.get_or_init(|| {
            let started = std::time::Instant::now();
            // The logits' width where the metadata gives it; ids past the tokenizer's
            // vocabulary have no bytes and are never allowed.
            let vocab =
                (self.model.config().vocab_size.unwrap_or(0)).max(self.tokenizer.vocab_size());
            let compiler = GrammarCompiler::new(self.tokenizer.clone(), vocab, &self.stop_ids)
                .map_err(|e| e.to_string());
            tracing::info!(
                vocab,
                ms = started.elapsed().as_millis() as u64,
                "grammar engine ready"
            );
            compiler
        });
        match compiler {
            Ok(c) => c.compile(format, limits),
            Err(e) => Err(EngineError::Tokenizer(e.clone())),
        }
    }

    /// Queues a generation whose prompt and constraint the caller prepared: a place, then the
    /// request in it (what [`Reserved`] → [`Prepared`] → [`Prepared::submit`] does for a
    /// request that is prepared only once it has its place).
    pub fn submit(&self, request: GenerationRequest, policy: QueuePolicy) -> Result<TokenStream> {
        let slot = self.take_place(policy)?;
        self.submit_reserved(request, slot)
    }

    /// Takes a place in the queue, or answers [`EngineError::Busy`] when the queue is full, or
    /// when `policy` is [`QueuePolicy::RejectIfBusy`] and no batch slot is free. Cheap and
    /// exact under concurrency: call it before preparing the prompt, so that refusing a
    /// request costs the same whatever its size.
    pub fn reserve(&self, policy: QueuePolicy) -> Result<Reserved> {
        Ok(Reserved {
            engine: self.clone(),
            slot: self.take_place(policy)?,
        })
    }

    fn take_place(&self, policy: QueuePolicy) -> Result<QueueSlot> {
        let queued = &self.stats.queued;
        let mut current = queued.load(Ordering::Relaxed);
        loop {
            let in_flight = current + self.stats.active.load(Ordering::Relaxed);
            if !admission::accepts(&self.config, in_flight, policy) {
                return Err(EngineError::Busy);
            }
            match queued.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(QueueSlot {
                        stats: self.stats.clone(),
                        held: true,
                    })
                }
                Err(now) => current = now,
            }
        }
    }

    /// Queues a generation in a place already taken. Fails at once (never blocks) when the
    /// request is malformed, or when the prompt does not fit the context window or could never
    /// fit the KV budget; the place is given back then.
    fn submit_reserved(
        &self,
        request: GenerationRequest,
        mut slot: QueueSlot,
    ) -> Result<TokenStream> {
        let prompt_len = request.prompt.len();
        let max_tokens = request.stopping.max_tokens;
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest(
                "the prompt has no tokens".into(),
            ));
        }
        if max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if request.stopping.stop.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest(
                "stop strings must not be empty".into(),
            ));
        }
        check_context(prompt_len, max_tokens, self.context_window)?;
        let reservation = KvReservation::new(
            &self.model.kv_layout(),
            self.config.kv_storage,
            prompt_len,
            max_tokens,
            self.model.config().context_length,
        );
        if !admission::could_ever_fit(&self.config, &reservation) {
            return Err(EngineError::KvCacheBudgetExceeded {
                prompt_tokens: prompt_len,
                max_tokens,
                needed_mib: reservation.bytes.div_ceil(1 << 20),
                budget_mib: self.config.kv_cache_budget.unwrap_or(usize::MAX) >> 20,
            });
        }
        let (tx, stream) = output::channel(self.tokenizer.clone(), request.stopping.stop.clone());
        let submission = Submission {
            request,
            reservation,
            tx,
        };
        if self.tx.send(submission).is_err() {
            return Err(EngineError::Stopped);
        }
        // The engine thread counts it down from here (admitted or cancelled).
        slot.held = false;
        Ok(stream)
    }

    /// Whether the engine can serve (what `/health` reports).
    pub fn health(&self) -> Health {
        self.stats.health()
    }

    /// Sets the faults the engine injects from its next step on (test builds only).
    #[cfg(feature = "fault-injection")]
    pub fn inject_faults(&self, faults: faults::Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
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

    /// The KV cache layout, for sizing budgets.
    pub fn kv_layout(&self) -> KvLayout {
        self.model.kv_layout()
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// How the model writes tool calls (read off its chat template).
    pub fn tool_calling(&self) -> ToolCalling {
        self.template.tool_calling()
    }
}
