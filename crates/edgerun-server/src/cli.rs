//! The `edgerun` binary's command line: every subcommand and flag, each flag with its
//! `EDGERUN_*` environment variable and default. What the values mean together (validation,
//! the scheduler's and the wire's limits) is `main.rs`'s; this file only declares them.

use clap::{Args, Parser, Subcommand};
use edgerun_engine::gguf::Scheme;
use edgerun_engine::{DeviceSpec, GrammarLimits, KvStorage};
use edgerun_protocol::{RequestLimits, SchemaLimits};
use std::net::SocketAddr;
use std::path::PathBuf;
#[derive(Parser)]
#[command(
    name = "edgerun",
    version,
    about = "A Workers-AI-compatible LLM inference node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load a model and serve it over HTTP.
    Serve(Box<ServeArgs>),
    /// Exit 0 if a node's /health answers 200 (for container health checks).
    Health {
        /// The node's address.
        #[arg(long, env = "EDGERUN_LISTEN", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
    /// Write a llama GGUF with RANDOM weights in a named shape and a llama.cpp quantization
    /// layout, for benchmarks and parity tests (never a usable model: its name says so).
    Generate(Box<GenerateArgs>),
    /// Requantize a llama GGUF into a llama.cpp layout (as `llama-quantize --allow-requantize`).
    Quantize {
        /// The GGUF to read.
        input: PathBuf,
        /// Where to write the result.
        output: PathBuf,
        /// Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or Q4_1.
        scheme: Scheme,
    },
    /// Rewrite a llama GGUF as a qwen2 one computing the same function (q and k rows in the
    /// Hugging Face order, rotary embeddings over halves, q/k/v biases: zeros, or random with
    /// --bias-seed), for parity tests of the qwen2 path on real weights. Its name says so.
    AsQwen2 {
        /// The llama GGUF to read.
        input: PathBuf,
        /// Where to write the result.
        output: PathBuf,
        /// Random q/k/v biases (standard deviation 0.1) from this seed instead of zeros.
        #[arg(long)]
        bias_seed: Option<u64>,
    },
    /// Rewrite a llama GGUF as a qwen3 one (q and k rows in the Hugging Face order, rotary
    /// embeddings over halves, per-head q and k norms: ones, or near one with --norm-seed), for
    /// parity tests of the qwen3 path on real weights. The norms change the function; its
    /// name says so.
    AsQwen3 {
        /// The llama GGUF to read.
        input: PathBuf,
        /// Where to write the result.
        output: PathBuf,
        /// Norm weights 1 + u (u of standard deviation 0.1) from this seed instead of ones.
        #[arg(long)]
        norm_seed: Option<u64>,
    },
    /// Check that this machine runs this build on a device, without loading anything: the
    /// driver's CUDA version against the build's, the GPU's compute capability against the
    /// kernels'. Prints what it found; exits 2 with one line saying what to install or rebuild.
    /// `serve` and `check-device` run the same check first.
    Preflight {
        /// The device: cuda:N, auto, metal or cpu.
        #[arg(long, env = "EDGERUN_DEVICE", default_value = "cuda:0")]
        device: DeviceSpec,
    },
    /// Check a device's forward pass against the CPU's on one GGUF (scripts/gpu-check.sh):
    /// logits within a tolerance, greedy tokens equal but at near ties, a batch equal to each
    /// prompt alone. Exits 1 when a check fails.
    CheckDevice {
        /// The GGUF to run on both (a small generated one will do).
        model: PathBuf,
        /// The device checked: cuda:N, metal, or cpu (cpu checks our kernels against candle's).
        #[arg(long, env = "EDGERUN_DEVICE", default_value = "cuda:0")]
        device: DeviceSpec,
        /// Greedy tokens per prompt.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Prompts decoded together in the batching check.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Largest logit difference accepted (over every logit of every step), as a fraction of
        /// the largest |logit| of the CPU's run.
        #[arg(long, default_value_t = 0.05)]
        logit_tolerance: f32,
        /// Top-2 margin, as the same fraction, below which a flipped token is a near tie.
        #[arg(long, default_value_t = 0.03)]
        tie_margin: f32,
        /// How the checked device stores KV caches: contiguous or paged; by default what it
        /// serves with (paged on CUDA).
        #[arg(long)]
        kv_storage: Option<KvStorage>,
    },
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Where to write the GGUF.
    pub output: PathBuf,
    /// A named shape: llama-3-8b, llama-3-mini, smollm2-135m. Without one, every dimension flag
    /// below is required; with one, they override its values.
    #[arg(long)]
    pub shape: Option<String>,
    /// Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or Q4_1.
    #[arg(long, default_value = "Q4_K_M")]
    pub quant: Scheme,
    /// A GGUF whose tokenizer (every `tokenizer.*` key) the model gets; its vocabulary size
    /// must match the shape's (llama-3 shapes: llama.cpp's ggml-vocab-llama-bpe.gguf).
    #[arg(long)]
    pub vocab_from: PathBuf,
    /// Seed of the random weights (the same seed writes the same file).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub dim: Option<usize>,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub ff: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long)]
    pub rope_base: Option<f32>,
    /// No output matrix: the token embedding is the output layer.
    #[arg(long)]
    pub tied: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A model to serve (repeatable; comma-separated in the env var): a GGUF path,
    /// `hf:owner/repo/file.gguf` or a catalog name such as `@cf/meta/llama-3-8b-instruct` for
    /// a text-generation model (each its own engine and KV pool); an encoder directory, `hf:owner/repo` or a
    /// catalog name such as `@cf/baai/bge-small-en-v1.5` for an embedding model (any number).
    /// `NAME=SPEC` serves it under NAME too.
    #[arg(long, env = "EDGERUN_MODEL", value_delimiter = ',', required = true)]
    pub model: Vec<String>,
    /// Texts' padded tokens one embedding forward pass takes at most (and so its activation
    /// memory); at least the model's longest input.
    #[arg(long, env = "EDGERUN_EMBED_BATCH_TOKENS", default_value_t = 8192)]
    pub embed_batch_tokens: usize,
    /// Tokens one embedding request may hold in all (400 beyond); requests run first come first
    /// served, so this bounds how long one holds up those behind it. At least the model's
    /// longest input.
    #[arg(
        long,
        env = "EDGERUN_EMBED_MAX_REQUEST_TOKENS",
        default_value_t = 65_536
    )]
    pub embed_max_request_tokens: usize,
    /// Embedding requests allowed to wait per embedding model before new ones get 429.
    #[arg(long, env = "EDGERUN_EMBED_MAX_QUEUE", default_value_t = 256)]
    pub embed_max_queue: usize,
    /// Extra names to serve the first --model under (repeatable; comma-separated in the env
    /// var).
    #[arg(long = "served-as", env = "EDGERUN_SERVED_AS", value_delimiter = ',')]
    pub served_as: Vec<String>,
    /// A Hugging Face tokenizer.json to use instead of the GGUF's tokenizer (a node with one
    /// text-generation model only).
    #[arg(long, env = "EDGERUN_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Model catalog (TOML) for Workers AI names; the built-in one when absent.
    #[arg(long, env = "EDGERUN_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "EDGERUN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where to run the model: auto, cpu, cuda:N or metal.
    #[arg(long, env = "EDGERUN_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// Bearer tokens callers must present (repeatable; comma-separated in the env var).
    #[arg(
        long = "api-token",
        env = "EDGERUN_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_tokens: Vec<String>,
    /// A file with one bearer token per line (blank lines and `#` comments are ignored).
    #[arg(long, env = "EDGERUN_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Serve without any token on a non-loopback address. Only behind something that
    /// authenticates for you.
    #[arg(long, env = "EDGERUN_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Cloudflare Access team domain (`<team>.cloudflareaccess.com`). With --access-aud, run
    /// routes require a valid `Cf-Access-Jwt-Assertion` (403 otherwise); /health and /metrics
    /// do not.
    #[arg(long, env = "EDGERUN_ACCESS_TEAM_DOMAIN")]
    pub access_team_domain: Option<String>,
    /// The Access application's AUD tag (needs --access-team-domain).
    #[arg(long, env = "EDGERUN_ACCESS_AUD")]
    pub access_aud: Option<String>,
    /// Where to fetch the Access signing keys; defaults to
    /// `https://<team domain>/cdn-cgi/access/certs`.
    #[arg(long, env = "EDGERUN_ACCESS_CERTS_URL")]
    pub access_certs_url: Option<String>,
    /// Seconds after the last successful key fetch beyond which Access tokens are no longer
    /// trusted (503 instead); at least the key cache lifetime (3600).
    #[arg(
        long,
        env = "EDGERUN_ACCESS_MAX_STALENESS_SECS",
        default_value_t = 86_400
    )]
    pub access_max_staleness_secs: u64,
    /// Browser origins allowed to call the node (CORS), `scheme://host[:port]` each, or `*`
    /// for any; repeat the flag or separate with commas. None (the default): no CORS headers,
    /// so browsers refuse cross-origin calls. The bearer token is required either way.
    #[arg(
        long = "cors-origin",
        env = "EDGERUN_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Prompt plus max_tokens allowed; defaults to the catalog's window or the model's own.
    #[arg(long, env = "EDGERUN_CONTEXT_WINDOW")]
    pub context_window: Option<usize>,
    /// Sequences decoded together at most. Default: 16 on the CPU, 64 on a GPU.
    #[arg(long, env = "EDGERUN_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Requests allowed to wait for a slot before new ones get 429. Default: 64 on the CPU, 256
    /// on a GPU.
    #[arg(long, env = "EDGERUN_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Prompt tokens read per sequence per step (smaller keeps other streams smoother).
    /// Default: 128 on the CPU, 2048 on a GPU.
    #[arg(long, env = "EDGERUN_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// Tokens per step across all sequences. Default: 256 on the CPU, 4096 on a GPU.
    #[arg(long, env = "EDGERUN_MAX_STEP_TOKENS")]
    pub max_step_tokens: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long, env = "EDGERUN_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds of silence on a stream before an SSE keep-alive comment.
    #[arg(long, env = "EDGERUN_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,
    /// KV cache memory in MiB: the paged pool's size (its blocks hold running sequences and
    /// the prefix cache), or with contiguous storage what running sequences may reserve
    /// together (requests beyond it wait). Default on CPU: a quarter of the memory available
    /// at start for a pool (its pages are touched as blocks are first used), half of it for
    /// contiguous caches; on a GPU: what --gpu-memory-fraction leaves once the weights are
    /// loaded. With several text-generation models that default is split evenly among them;
    /// one size here is each model's, or give one per model in --model order (comma-separated).
    #[arg(long, env = "EDGERUN_KV_CACHE_MIB", value_delimiter = ',')]
    pub kv_cache_mib: Vec<usize>,
    /// On a GPU without --kv-cache-mib: the share of the device's memory the node may use in
    /// all. The KV pool gets it less what is in use once the weights are loaded, less the
    /// activations the largest step needs (estimated from the model and the step limits).
    #[arg(long, env = "EDGERUN_GPU_MEMORY_FRACTION", default_value_t = 0.9)]
    pub gpu_memory_fraction: f64,
    /// How KV caches are stored: `paged` (one pool of 16-position blocks, sized by the KV
    /// budget and allocated at start; the default: it holds the prefix cache) or `contiguous`
    /// (per sequence; no prefix cache; Metal's default).
    #[arg(long, env = "EDGERUN_KV_STORAGE")]
    pub kv_storage: Option<KvStorage>,
    /// With paged KV storage, copy every sequence's logits to the host sampler instead of
    /// sampling where they are (the device sampler returns only token ids; both pick the
    /// same tokens). For diagnosis.
    #[arg(long, env = "EDGERUN_HOST_SAMPLING")]
    pub host_sampling: bool,
    /// Turn off the prefix cache: with paged KV storage, full blocks of earlier prompts are
    /// kept and reused by prompts that begin with the same tokens (a conversation's next turn,
    /// a shared system prompt); usage reports them as cached tokens.
    #[arg(long, env = "EDGERUN_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// CPU threads for model compute; defaults to the number of physical cores.
    #[arg(long, env = "EDGERUN_THREADS")]
    pub threads: Option<usize>,
    /// Seconds to let in-flight requests finish after SIGTERM / Ctrl-C. At the deadline every
    /// generation still running ends with an error (stream error event, or 503), and the
    /// process exits with status 1 if it cut any.
    #[arg(long, env = "EDGERUN_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Open connections at most; beyond it new ones get 503 and are closed.
    #[arg(long, env = "EDGERUN_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request head (from connecting, or from the first byte
    /// of the next request on a kept-alive connection).
    #[arg(long, env = "EDGERUN_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle between requests.
    #[arg(long, env = "EDGERUN_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Seconds the whole request body has to arrive in (408 otherwise).
    #[arg(long, env = "EDGERUN_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Bytes per second a request body must keep arriving at after its first 5 seconds (408
    /// otherwise).
    #[arg(long, env = "EDGERUN_MIN_BODY_RATE", default_value_t = 1024)]
    pub min_body_rate: usize,
    /// Seconds a stream whose client stopped reading is kept (paused) before it is dropped,
    /// freeing its batch slot and KV cache, and ended with an error event; also how long any
    /// write to a client may stay blocked before its connection is closed (for a dropped
    /// stream, counted from the drop, so its client can still read the error).
    #[arg(long, env = "EDGERUN_STALLED_STREAM_SECS", default_value_t = 30)]
    pub stalled_stream_secs: u64,
    /// Prompts templated and tokenized at once (the CPU work before the engine); defaults to
    /// --threads.
    #[arg(long, env = "EDGERUN_PREPARE_THREADS")]
    pub prepare_threads: Option<usize>,
    /// Largest JSON schema (response_format's, or one tool's parameters), in bytes as compact
    /// JSON; larger is 400.
    #[arg(long, env = "EDGERUN_MAX_SCHEMA_BYTES", default_value_t = SchemaLimits::DEFAULT.max_bytes)]
    pub max_schema_bytes: usize,
    /// Most JSON values in one schema.
    #[arg(long, env = "EDGERUN_MAX_SCHEMA_NODES", default_value_t = SchemaLimits::DEFAULT.max_nodes)]
    pub max_schema_nodes: usize,
    /// Deepest schema: objects and arrays on its deepest path, following `$ref`s (at most
    /// 4096; the grammar compiler's stack is sized for it).
    #[arg(long, env = "EDGERUN_MAX_SCHEMA_DEPTH", default_value_t = SchemaLimits::DEFAULT.max_depth)]
    pub max_schema_depth: usize,
    /// Most `$ref`s a schema follows one after another.
    #[arg(
        long,
        env = "EDGERUN_MAX_SCHEMA_REF_DEPTH",
        default_value_t = SchemaLimits::DEFAULT.max_ref_depth
    )]
    pub max_schema_ref_depth: usize,
    /// Most tools in one request (OpenAI allows 128).
    #[arg(long, env = "EDGERUN_MAX_TOOLS", default_value_t = RequestLimits::DEFAULT.max_tools)]
    pub max_tools: usize,
    /// Milliseconds an output format (a schema, a forced call's grammar) may take to compile
    /// before the request is refused (400).
    #[arg(
        long,
        env = "EDGERUN_GRAMMAR_COMPILE_MS",
        default_value_t = GrammarLimits::DEFAULT.compile_budget.as_millis() as u64
    )]
    pub grammar_compile_ms: u64,
}
