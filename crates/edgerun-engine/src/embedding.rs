//! Embeddings: an encoder model ([`crate::models::bert`]) behind a batching thread of its own.
//!
//! ```text
//! EmbedInput (text or token ids) ──Embedder::tokenize──▶ ids      (caller's thread, blocking:
//!                                                                  the server's prepare pool)
//! ids + Pooling ──Embedder::submit──▶ bounded queue ──▶ embedding thread      (or Busy: 429)
//!   embedding thread, each turn: take the first job, then every job already waiting up to
//!   `max_batch_tokens`; drop jobs whose caller is gone; sort their inputs by length and cut
//!   them into batches of at most `max_batch_tokens` (count × longest); one encoder call
//!   per batch (candle's: one padded forward; the x86 CPU's (AVX-512 or AVX2): texts packed without padding,
//!   in passes of at most `bert::cpu::CHUNK_TOKENS`); pool (mean over the text's tokens, or
//!   [CLS]), normalise when the model's
//!   sentence-transformers pipeline does; answer each job once all its inputs are done
//! EmbedTicket::wait ◀── Vec<Vec<f32>> (one per input, in order) or the error of its batch
//! ```
//!
//! A text longer than the model reads ([`EmbedderInfo::max_tokens`]: sentence-transformers'
//! `max_seq_length`, else the position table) is refused unless the caller asked for
//! truncation, as Workers AI does (`truncate_inputs`); truncation keeps the special tokens, as
//! `tokenizers`' own truncation does.
//!
//! Must never: run the encoder on the caller's thread; hold more than `max_queue` jobs; let a
//! failed batch fail any job outside it; keep computing for a caller that went away.

use crate::error::{EngineError, Result};
use crate::models::bert::{BertEncoder, BertKernels};
use candle_core::Device;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::oneshot;

/// How one input's token vectors become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the input's tokens (padding excluded).
    Mean,
    /// The first token's (`[CLS]`) vector.
    Cls,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }
}

/// One input: text, or token ids used as they are (OpenAI's token-array inputs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// What an embedding model is, for the routes and the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderInfo {
    /// Length of every vector.
    pub dimensions: usize,
    /// Most tokens one input may have (special tokens included).
    pub max_tokens: usize,
    /// The pooling the model was trained with (its `1_Pooling/config.json`; mean without one).
    pub pooling: Pooling,
    /// Whether its pipeline ends with a `Normalize` module (vectors of length 1).
    pub normalize: bool,
    pub vocab_size: usize,
}

/// Limits of the embedding thread, refused at start when zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingConfig {
    /// Padded tokens (inputs × longest input) one forward pass takes at most; also how many
    /// tokens of waiting jobs one turn gathers.
    pub max_batch_tokens: usize,
    /// Jobs (requests) allowed to wait; beyond it `submit` answers [`EngineError::Busy`].
    pub max_queue: usize,
    /// Tokens one request may hold in all (a 400 beyond): jobs run first come first served,
    /// so this bounds how long one request holds up those behind it.
    pub max_request_tokens: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            max_queue: 256,
            max_request_tokens: 65_536,
        }
    }
}

/// An encoder with its tokenizer and pipeline, loaded and not yet serving.
pub struct EmbeddingModel {
    encoder: BertEncoder,
    tokenizer: Tokenizer,
    truncating: Tokenizer,
    info: EmbedderInfo,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Load(format!("{}: {e}", path.display()))),
    }
}

/// Reads the model's sentence-transformers pipeline: pooling (its `pooling_mode_*` flags),
/// whether it normalises, and its `max_seq_length`.
fn read_pipeline(dir: &Path) -> Result<(Pooling, bool, Option<usize>)> {
    let modules = read_json(&dir.join("modules.json"))?;
    let mut pooling_dir = dir.join("1_Pooling");
    let mut normalize = false;
    if let Some(modules) = &modules {
        let list = modules.as_array().ok_or_else(|| {
            EngineError::Load(format!(
                "{}: not a list",
                dir.join("modules.json").display()
            ))
        })?;
        for m in list {
            let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            let path = m.get("path").and_then(|t| t.as_str()).unwrap_or_default();
            match kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" | "" => {}
                "Pooling" => pooling_dir = dir.join(path),
                "Normalize" => normalize = true,
                other => {
                    return Err(EngineError::Load(format!(
                        "{}: module `{other}` is not supported (Transformer, Pooling, Normalize)",
                        dir.join("modules.json").display()
                    )))
                }
            }
        }
    }
    let pooling = match read_json(&pooling_dir.join("config.json"))? {
        None => Pooling::Mean,
        Some(cfg) => {
            let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            let others = [
                "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens",
                "pooling_mode_lasttoken",
            ];
            if let Some(k) = others.iter().find(|k| on(k)) {
                return Err(EngineError::Load(format!(
                    "{}: {k} is not supported (mean or cls pooling)",
                    pooling_dir.join("config.json").display()
                )));
            }
            match (on("pooling_mode_cls_token"), on("pooling_mode_mean_tokens")) {
                (true, false) => Pooling::Cls,
                (false, true) => Pooling::Mean,
                _ => {
                    return Err(EngineError::Load(format!(
                        "{}: exactly one of pooling_mode_cls_token and pooling_mode_mean_tokens \
                         must be set",
                        pooling_dir.join("config.json").display()
                    )))
                }
            }
        }
    };
    let max_seq = match read_json(&dir.join("sentence_bert_config.json"))? {
        None => None,
        Some(cfg) => match cfg.get("max_seq_length") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                EngineError::Load(format!(
                    "{}: max_seq_length is not a whole number",
                    dir.join("sentence_bert_config.json").display()
                ))
            })? as usize),
        },
    };
    Ok((pooling, normalize, max_seq))
}

impl EmbeddingModel {
    /// Loads an encoder from a Hugging Face model directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json`, and sentence-transformers' pipeline files).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with(dir, device, BertKernels::Auto)
    }

    /// [`EmbeddingModel::load`] with the encoder's implementation chosen ([`BertKernels`]).
    pub fn load_with(dir: &Path, device: &Device, kernels: BertKernels) -> Result<Self> {
        let encoder = BertEncoder::load(dir, device, kernels)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", tok_path.display())))?;
        // The file's own padding and truncation are for training; this service pads batches
        // itself and truncates only when asked.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EngineError::Load(format!("{}: {e}", tok_path.display())))?;
        let (pooling, normalize, max_seq) = read_pipeline(dir)?;
        let config = encoder.config();
        let max_tokens = max_seq
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);
        if max_tokens < 2 {
            return Err(EngineError::Load(format!(
                "{}: max_seq_length {max_tokens} leaves no room for a token",
                dir.display()
            )));
        }
        let mut truncating = tokenizer.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Load(format!("{}: {e}", tok_path.display())))?;
        let info = EmbedderInfo {
            dimensions: config.hidden_size,
            max_tokens,
            pooling,
            normalize,
            vocab_size: config.vocab_size,
        };
        Ok(Self {
            encoder,
            tokenizer,
            truncating,
            info,
        })
    }

    pub fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    /// Which encoder implementation runs ([`BertEncoder::kernels`]).
    pub fn kernels(&self) -> &'static str {
        self.encoder.kernels()
    }

    /// Token ids of each input: texts tokenized with the model's special tokens (truncated to
    /// [`EmbedderInfo::max_tokens`] when `truncate`, else refused when longer), token inputs
    /// checked against the vocabulary and the length limit.
    pub fn tokenize(&self, inputs: &[EmbedInput], truncate: bool) -> Result<Vec<Vec<u32>>> {
        let max = self.info.max_tokens;
        inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let ids = match input {
                    EmbedInput::Text(text) => {
                        let tok = if truncate {
                            &self.truncating
                        } else {
                            &self.tokenizer
                        };
                        let ids = tok
                            .encode(text.as_str(), true)
                            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
                            .get_ids()
                            .to_vec();
                        if ids.is_empty() {
                            return Err(EngineError::InvalidRequest(format!(
                                "input {i} has no tokens"
                            )));
                        }
                        ids
                    }
                    EmbedInput::Tokens(ids) => {
                        if ids.is_empty() {
                            return Err(EngineError::InvalidRequest(format!(
                                "input {i} has no tokens"
                            )));
                        }
                        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.info.vocab_size)
                        {
                            return Err(EngineError::InvalidRequest(format!(
                                "input {i}: token {bad} is not in the model's vocabulary of {}",
                                self.info.vocab_size
                            )));
                        }
                        if truncate && ids.len() > max {
                            ids[..max].to_vec()
                        } else {
                            ids.clone()
                        }
                    }
                };
                if ids.len() > max {
                    return Err(EngineError::InvalidRequest(format!(
                        "input {i} has {} tokens; this model reads at most {max} (ask for \
                         truncation to embed its first {max})",
                        ids.len()
                    )));
                }
                Ok(ids)
            })
            .collect()
    }

    /// Embeds a batch of tokenized inputs on the calling thread (one forward pass, or a few for
    /// a long batch on the CPU); one vector per input, in order.
    pub fn embed_batch(&self, rows: &[&[u32]], poolings: &[Pooling]) -> Result<Vec<Vec<f32>>> {
        let mut out = self.encoder.pooled(rows, poolings)?;
        for v in &mut out {
            if self.info.normalize {
                // sentence-transformers' Normalize: x / max(‖x‖, 1e-12).
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(out)
    }
}

struct Job {
    tokens: Vec<Vec<u32>>,
    pooling: Pooling,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// Counters of the embedding thread (`/metrics`, `/health`).
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicUsize,
    requests: AtomicU64,
    inputs: AtomicU64,
    tokens: AtomicU64,
    batches: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of the embedding thread's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbedStats {
    /// Jobs waiting or running.
    pub queued_requests: usize,
    /// Jobs answered (with vectors).
    pub requests: u64,
    /// Inputs embedded.
    pub inputs: u64,
    /// Tokens read (padding excluded).
    pub tokens: u64,
    /// Forward passes.
    pub batches: u64,
    /// Jobs answered with an error.
    pub failed: u64,
}

struct Shared {
    model: EmbeddingModel,
    counters: Counters,
    config: EmbeddingConfig,
    /// Cleared when the thread ends, however it ends (`/health` says so).
    running: std::sync::atomic::AtomicBool,
}

/// A handle to a running embedding thread. Cheap to clone; the thread stops when the last
/// handle is dropped, after answering what it holds.
#[derive(Clone)]
pub struct Embedder {
    tx: mpsc::SyncSender<Job>,
    shared: Arc<Shared>,
}

/// A submitted job's answer, to be awaited. Dropping it abandons the job (it is skipped if it
/// has not run yet).
pub struct EmbedTicket(oneshot::Receiver<Result<Vec<Vec<f32>>>>);

impl EmbedTicket {
    /// The vectors, one per input in order, or the job's error.
    pub async fn wait(self) -> Result<Vec<Vec<f32>>> {
        self.0.await.unwrap_or(Err(EngineError::Stopped))
    }

    /// [`EmbedTicket::wait`] for a thread outside an async runtime.
    pub fn blocking_wait(self) -> Result<Vec<Vec<f32>>> {
        self.0.blocking_recv().unwrap_or(Err(EngineError::Stopped))
    }
}

impl Embedder {
    /// Starts the embedding thread for `model`.
    pub fn start(model: EmbeddingModel, config: EmbeddingConfig) -> Result<Self> {
        if config.max_batch_tokens < model.info.max_tokens {
            return Err(EngineError::Config(format!(
                "max_batch_tokens {} is below the model's longest input ({} tokens)",
                config.max_batch_tokens, model.info.max_tokens
            )));
        }
        if config.max_queue == 0 {
            return Err(EngineError::Config("max_queue must be at least 1".into()));
        }
        if config.max_request_tokens < model.info.max_tokens {
            return Err(EngineError::Config(format!(
                "max_request_tokens {} is below the model's longest input ({} tokens)",
                config.max_request_tokens, model.info.max_tokens
            )));
        }
        let (tx, rx) = mpsc::sync_channel(config.max_queue);
        let shared = Arc::new(Shared {
            model,
            counters: Counters::default(),
            config,
            running: std::sync::atomic::AtomicBool::new(true),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("edgerun-embed".into())
            .spawn(move || run(&worker, rx))
            .map_err(|e| EngineError::Config(format!("cannot start the embedding thread: {e}")))?;
        Ok(Self { tx, shared })
    }

    pub fn info(&self) -> &EmbedderInfo {
        self.shared.model.info()
    }

    /// Whether the embedding thread still runs (it ends only by a panic while handles exist).
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::Relaxed)
    }

    /// [`EmbeddingModel::tokenize`]; blocking (call it off the async runtime's workers).
    pub fn tokenize(&self, inputs: &[EmbedInput], truncate: bool) -> Result<Vec<Vec<u32>>> {
        self.shared.model.tokenize(inputs, truncate)
    }

    /// Queues tokenized inputs; [`EngineError::Busy`] when `max_queue` jobs already wait, at
    /// once, never blocking; [`EngineError::InvalidRequest`] over `max_request_tokens`.
    pub fn submit(&self, tokens: Vec<Vec<u32>>, pooling: Pooling) -> Result<EmbedTicket> {
        let total: usize = tokens.iter().map(Vec::len).sum();
        let cap = self.shared.config.max_request_tokens;
        if total > cap {
            return Err(EngineError::InvalidRequest(format!(
                "the request's inputs hold {total} tokens; this node embeds at most {cap} per \
                 request: split it"
            )));
        }
        let (reply, rx) = oneshot::channel();
        let counters = &self.shared.counters;
        counters.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Job {
            tokens,
            pooling,
            reply,
        }) {
            Ok(()) => Ok(EmbedTicket(rx)),
            Err(e) => {
                counters.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::TrySendError::Full(_) => EngineError::Busy,
                    mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }

    /// Which encoder implementation runs ([`EmbeddingModel::kernels`]).
    pub fn kernels(&self) -> &'static str {
        self.shared.model.kernels()
    }

    /// Memory the largest batch needs besides the weights, in bytes (an estimate, for a GPU's
    /// memory plan): per padded token, the hidden states and their copies within a layer
    /// (~8 × hidden), the feed-forward's (2 × intermediate) and the attention scores and
    /// weights (2 × heads × the longest input), in f32.
    pub fn activation_bytes(&self) -> usize {
        let c = self.shared.model.encoder.config();
        let per_token = 8 * c.hidden_size
            + 2 * c.intermediate_size
            + 2 * c.num_attention_heads * self.info().max_tokens;
        self.shared.config.max_batch_tokens * per_token * 4
    }

    pub fn stats(&self) -> EmbedStats {
        let c = &self.shared.counters;
        EmbedStats {
            queued_requests: c.queued.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            inputs: c.inputs.load(Ordering::Relaxed),
            tokens: c.tokens.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }
}

/// The embedding thread: gather, batch, answer, until every handle is gone.
fn run(shared: &Shared, rx: mpsc::Receiver<Job>) {
    /// Clears `running` however the thread ends.
    struct Running<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    let _running = Running(&shared.running);
    let cap = shared.config.max_batch_tokens;
    let counters = &shared.counters;
    while let Ok(first) = rx.recv() {
        let mut gathered: usize = first.tokens.iter().map(Vec::len).sum();
        let mut jobs = vec![first];
        while gathered < cap {
            match rx.try_recv() {
                Ok(job) => {
                    gathered += job.tokens.iter().map(Vec::len).sum::<usize>();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Callers that went away are not computed for.
        let (live, gone): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| !j.reply.is_closed());
        counters.queued.fetch_sub(gone.len(), Ordering::Relaxed);
        let results = embed_jobs(shared, &live);
        for (job, result) in live.into_iter().zip(results) {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            if job.reply.is_closed() {
                // Left while it ran: its remaining batches were skipped; nobody to answer.
                continue;
            }
            match &result {
                Ok(v) => {
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    counters.inputs.fetch_add(v.len() as u64, Ordering::Relaxed);
                    let t: usize = job.tokens.iter().map(Vec::len).sum();
                    counters.tokens.fetch_add(t as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = job.reply.send(result);
        }
    }
}

/// Every input of `jobs`, longest first, in padded batches of at most `max_batch_tokens`; one
/// result per job (the first error of any of its batches, or its vectors in order).
fn embed_jobs(shared: &Shared, jobs: &[Job]) -> Vec<Result<Vec<Vec<f32>>>> {
    let cap = shared.config.max_batch_tokens;
    let mut rows: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.tokens.len()).map(move |i| (j, i)))
        .collect();
    let len_of = |&(j, i): &(usize, usize)| jobs[j].tokens[i].len();
    rows.sort_by_key(|r| std::cmp::Reverse(len_of(r)));
    let mut out: Vec<Result<Vec<Vec<f32>>>> = jobs
        .iter()
        .map(|job| Ok(vec![Vec::new(); job.tokens.len()]))
        .collect();
    let mut start = 0;
    while start < rows.len() {
        // Sorted longest first: the batch's padded length is its first row's.
        let longest = len_of(&rows[start]).max(1);
        let fit = (cap / longest).max(1);
        let end = (start + fit).min(rows.len());
        // Rows of jobs whose caller left, or that a batch already failed, are not computed.
        let batch: Vec<(usize, usize)> = rows[start..end]
            .iter()
            .copied()
            .filter(|&(j, _)| !jobs[j].reply.is_closed() && out[j].is_ok())
            .collect();
        start = end;
        if batch.is_empty() {
            continue;
        }
        let ids: Vec<&[u32]> = batch.iter().map(|&(j, i)| &jobs[j].tokens[i][..]).collect();
        let poolings: Vec<Pooling> = batch.iter().map(|&(j, _)| jobs[j].pooling).collect();
        shared.counters.batches.fetch_add(1, Ordering::Relaxed);
        match shared.model.embed_batch(&ids, &poolings) {
            Ok(vectors) => {
                for (&(j, i), v) in batch.iter().zip(vectors) {
                    if let Ok(slots) = &mut out[j] {
                        slots[i] = v;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = batch.len(), "an embedding batch failed");
                let message = e.to_string();
                for &(j, _) in &batch {
                    if out[j].is_ok() {
                        out[j] = Err(EngineError::Model(candle_core::Error::Msg(format!(
                            "embedding failed: {message}"
                        ))));
                    }
                }
            }
        }
    }
    out
}
