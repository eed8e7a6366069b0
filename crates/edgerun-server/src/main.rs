//! The `edgerun` binary: configuration, model loading, and the listener.

mod cli;
mod load;

use anyhow::{bail, Context};
use clap::Parser;
use cli::{Cli, Command, GenerateArgs, ServeArgs};
use edgerun_engine::GrammarLimits;
use edgerun_engine::{DeviceSpec, EmbeddingConfig, SchedulerConfig};
use edgerun_protocol::{RequestLimits, SchemaLimits};
use edgerun_server::access::{AccessConfig, AccessVerifier};
use edgerun_server::model_set::{self, ModelSet};
use edgerun_server::models::Catalog;
use edgerun_server::serve::{self, ConnectionLimits};
use edgerun_server::{router, AppState, EmbeddingSlot, GenerationSlot, TokenSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    require_cpu_features();
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Health { addr } => return health(addr),
        Command::Generate(args) => return generate(*args),
        Command::Quantize {
            input,
            output,
            scheme,
        } => {
            let summary = edgerun_engine::gguf::requantize(&input, scheme, &output)?;
            println!("{}: {summary}", output.display());
            return Ok(());
        }
        Command::AsQwen2 {
            input,
            output,
            bias_seed,
        } => {
            let summary = edgerun_engine::gguf::derive::llama_as_qwen2(&input, &output, bias_seed)?;
            println!("{}: {summary}", output.display());
            return Ok(());
        }
        Command::AsQwen3 {
            input,
            output,
            norm_seed,
        } => {
            let summary = edgerun_engine::gguf::derive::llama_as_qwen3(&input, &output, norm_seed)?;
            println!("{}: {summary}", output.display());
            return Ok(());
        }
        Command::Preflight { device } => {
            match preflight_or_exit(&device) {
                Some(passed) => println!("preflight passed: {}", passed.summary),
                None => println!("preflight: nothing to check on {device:?}"),
            }
            return Ok(());
        }
        Command::CheckDevice {
            model,
            device,
            steps,
            batch,
            logit_tolerance,
            tie_margin,
            kv_storage,
        } => {
            if let Some(passed) = preflight_or_exit(&device) {
                println!("preflight passed: {}", passed.summary);
            }
            let subject = device.open()?;
            let check = edgerun_engine::device_check::DeviceCheck {
                steps,
                batch,
                logit_tolerance,
                tie_margin,
                storage: kv_storage.unwrap_or(SchedulerConfig::default_for(&subject).kv_storage),
            };
            let started = std::time::Instant::now();
            let report = edgerun_engine::device_check::compare(&model, &subject, check)?;
            println!(
                "{} on {device:?} ({:?} KV) against the CPU ({:.1}s):\n{report}",
                model.display(),
                check.storage,
                started.elapsed().as_secs_f32()
            );
            if !report.passed() {
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::Serve(args) => *args,
    };
    // Candle sizes its CPU thread pools from RAYON_NUM_THREADS, and without it recounts the
    // physical cores (reading /proc/cpuinfo) on every f32 matmul. Settle it once, here, while
    // the process is still single-threaded.
    let threads = match args.threads {
        Some(0) => bail!("--threads (EDGERUN_THREADS) must be at least 1"),
        Some(n) => n,
        None => num_cpus::get_physical().max(1),
    };
    // Our kernels run on a pool of their own that parks when idle (kernels/cpu.rs); candle's
    // barrier pool (its own ops) spins 25,000 times before parking, which against ours cost
    // 10-27% on 2 cores: a short spin makes the two measure like one.
    // SAFETY: no other thread exists yet.
    unsafe {
        for (var, value) in [
            ("RAYON_NUM_THREADS", threads.to_string()),
            ("CANDLE_NUM_THREADS", threads.to_string()),
            ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "500".to_string()),
        ] {
            if std::env::var_os(var).is_none() {
                std::env::set_var(var, value);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGERUN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    serve(args, threads)
}

/// Runs the device preflight (`edgerun_engine::device::preflight`): on a machine that cannot run
/// this build, prints the one line that says why and what to do, and exits 2 before anything is
/// loaded. Warnings (a GPU newer than the kernels, a build that recorded no target) go to stderr.
fn preflight_or_exit(device: &DeviceSpec) -> Option<edgerun_engine::device::preflight::Passed> {
    match device.preflight() {
        Ok(passed) => {
            for warning in passed.iter().flat_map(|p| &p.warnings) {
                eprintln!("edgerun: warning: {warning}");
            }
            passed
        }
        Err(e) => {
            eprintln!("edgerun: {e}");
            std::process::exit(2);
        }
    }
}

/// This binary is built for x86-64-v3 (AVX2, FMA, F16C, BMI2, ...): say so instead of dying
/// with SIGILL on an older CPU or a VM that hides some of them.
fn require_cpu_features() {
    let missing = edgerun_engine::kernels::cpu::missing_build_features();
    if !missing.is_empty() {
        eprintln!(
            "edgerun: this build needs CPU features this machine lacks ({}). Rebuild for this \
             machine with RUSTFLAGS=\"-C target-cpu=native\" cargo build --release -p edgerun-server",
            missing.join(", ")
        );
        std::process::exit(2);
    }
}

/// `edgerun generate`: a named or custom shape, random weights, a real tokenizer.
fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (name, mut shape) = match &args.shape {
        Some(name) => (name.clone(), edgerun_engine::gguf::shape(name)?),
        None => {
            let need = |v: Option<usize>, flag: &str| {
                v.with_context(|| format!("--{flag} is required without --shape"))
            };
            let shape = edgerun_engine::gguf::ModelShape {
                architecture: "llama",
                vocab: None,
                dim: need(args.dim, "dim")?,
                layers: need(args.layers, "layers")?,
                ff: need(args.ff, "ff")?,
                heads: need(args.heads, "heads")?,
                kv_heads: need(args.kv_heads, "kv-heads")?,
                head_dim: None,
                context: args.context.unwrap_or(4096),
                rope_base: args.rope_base.unwrap_or(10_000.0),
                rms_eps: 1e-5,
                tied_embeddings: args.tied,
            };
            ("custom".to_string(), shape)
        }
    };
    if args.shape.is_some() {
        let set = |v: Option<usize>, field: &mut usize| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(args.dim, &mut shape.dim);
        set(args.layers, &mut shape.layers);
        set(args.ff, &mut shape.ff);
        set(args.heads, &mut shape.heads);
        set(args.kv_heads, &mut shape.kv_heads);
        set(args.context, &mut shape.context);
        if let Some(b) = args.rope_base {
            shape.rope_base = b;
        }
        shape.tied_embeddings |= args.tied;
    }
    let started = std::time::Instant::now();
    let summary = edgerun_engine::gguf::generate(
        &name,
        &shape,
        args.quant,
        &args.vocab_from,
        args.seed,
        &args.output,
    )?;
    println!(
        "{}: random {name} {} in {:.1} s: {summary}",
        args.output.display(),
        args.quant,
        started.elapsed().as_secs_f32()
    );
    Ok(())
}

/// `edgerun health`: a minimal HTTP/1.0 GET of /health, so images need no curl.
fn health(addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let status = reply.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("/health answered {status:?}");
    }
    Ok(())
}

fn load_tokens(args: &ServeArgs) -> anyhow::Result<TokenSet> {
    let mut tokens = args.api_tokens.clone();
    if let Some(path) = &args.api_token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let before = tokens.len();
        tokens.extend(edgerun_protocol::auth::token_file_entries(&text).map(str::to_string));
        if tokens.len() == before {
            bail!(
                "token file {} holds no token (blank lines and # comments are ignored)",
                path.display()
            );
        }
    }
    Ok(TokenSet::new(tokens))
}

/// The Access verifier, when both the team domain and the AUD tag are given.
fn load_access(args: &ServeArgs) -> anyhow::Result<Option<Arc<AccessVerifier>>> {
    fn given(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
    let certs_url = given(&args.access_certs_url);
    let config = match (given(&args.access_team_domain), given(&args.access_aud)) {
        (Some(team), Some(aud)) => AccessConfig::new(team, aud)?,
        (None, None) if certs_url.is_none() => return Ok(None),
        _ => bail!(
            "Cloudflare Access needs both --access-team-domain and --access-aud (EDGERUN_ACCESS_TEAM_DOMAIN, EDGERUN_ACCESS_AUD)"
        ),
    };
    let config = match certs_url {
        Some(url) => config.with_certs_url(url)?,
        None => config,
    };
    let config = config.with_max_staleness(Duration::from_secs(args.access_max_staleness_secs))?;
    tracing::info!(
        team_domain = %config.team_domain,
        certs_url = %config.certs_url,
        "Cloudflare Access verification on for run routes"
    );
    Ok(Some(Arc::new(AccessVerifier::new(config)?)))
}

/// Checks every numeric setting before anything starts (refused, never clamped) and returns
/// the scheduler's over the CPU defaults, validated by the engine's own rule (the loader
/// applies the same flags again over the defaults of the device it opens:
/// [`scheduler_config`]).
fn validate_settings(args: &ServeArgs) -> anyhow::Result<SchedulerConfig> {
    if !(args.gpu_memory_fraction > 0.0 && args.gpu_memory_fraction <= 1.0) {
        bail!(
            "--gpu-memory-fraction (EDGERUN_GPU_MEMORY_FRACTION) must be more than 0 and at most 1, got {}",
            args.gpu_memory_fraction
        );
    }
    if args.context_window == Some(0) {
        bail!("--context-window (EDGERUN_CONTEXT_WINDOW) must be at least 1");
    }
    if args.heartbeat_secs == 0 {
        bail!("--heartbeat-secs (EDGERUN_HEARTBEAT_SECS) must be at least 1");
    }
    let positive = [
        (
            "--max-body-bytes (EDGERUN_MAX_BODY_BYTES)",
            args.max_body_bytes as u64,
        ),
        (
            "--max-connections (EDGERUN_MAX_CONNECTIONS)",
            args.max_connections as u64,
        ),
        (
            "--header-read-timeout-secs (EDGERUN_HEADER_READ_TIMEOUT_SECS)",
            args.header_read_timeout_secs,
        ),
        (
            "--idle-timeout-secs (EDGERUN_IDLE_TIMEOUT_SECS)",
            args.idle_timeout_secs,
        ),
        (
            "--body-timeout-secs (EDGERUN_BODY_TIMEOUT_SECS)",
            args.body_timeout_secs,
        ),
        (
            "--min-body-rate (EDGERUN_MIN_BODY_RATE)",
            args.min_body_rate as u64,
        ),
        (
            "--stalled-stream-secs (EDGERUN_STALLED_STREAM_SECS)",
            args.stalled_stream_secs,
        ),
        (
            "--shutdown-timeout-secs (EDGERUN_SHUTDOWN_TIMEOUT_SECS)",
            args.shutdown_timeout_secs,
        ),
    ];
    for (flag, value) in positive {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.prepare_threads == Some(0) {
        bail!("--prepare-threads (EDGERUN_PREPARE_THREADS) must be at least 1");
    }
    request_limits(args)?;
    let mut config = scheduler_config(args, SchedulerConfig::default())?;
    // Every size given is checked now; a budget from the device, known once it is open, is
    // checked by the loader then.
    let budgets = model_set::kv_budgets(&args.kv_cache_mib, args.kv_cache_mib.len().max(1))?;
    for budget in budgets {
        config.kv_cache_budget = Some(budget.unwrap_or(usize::MAX));
        validate_scheduler(&config)?;
    }
    Ok(config)
}

/// The bounds on what requests carry, and on compiling their output formats, from the flags:
/// every one at least 1, the schema depth at most [`SchemaLimits::MAX_DEPTH`] (refused, never
/// clamped).
fn request_limits(args: &ServeArgs) -> anyhow::Result<(RequestLimits, GrammarLimits)> {
    let flags = [
        (
            "--max-schema-bytes (EDGERUN_MAX_SCHEMA_BYTES)",
            args.max_schema_bytes,
        ),
        (
            "--max-schema-nodes (EDGERUN_MAX_SCHEMA_NODES)",
            args.max_schema_nodes,
        ),
        (
            "--max-schema-depth (EDGERUN_MAX_SCHEMA_DEPTH)",
            args.max_schema_depth,
        ),
        (
            "--max-schema-ref-depth (EDGERUN_MAX_SCHEMA_REF_DEPTH)",
            args.max_schema_ref_depth,
        ),
        ("--max-tools (EDGERUN_MAX_TOOLS)", args.max_tools),
        (
            "--grammar-compile-ms (EDGERUN_GRAMMAR_COMPILE_MS)",
            args.grammar_compile_ms as usize,
        ),
    ];
    for (flag, value) in flags {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if args.max_schema_depth > SchemaLimits::MAX_DEPTH {
        bail!(
            "--max-schema-depth (EDGERUN_MAX_SCHEMA_DEPTH) must be at most {}, got {}",
            SchemaLimits::MAX_DEPTH,
            args.max_schema_depth
        );
    }
    let limits = RequestLimits {
        schema: SchemaLimits {
            max_bytes: args.max_schema_bytes,
            max_nodes: args.max_schema_nodes,
            max_depth: args.max_schema_depth,
            max_ref_depth: args.max_schema_ref_depth,
        },
        max_tools: args.max_tools,
        ..RequestLimits::DEFAULT
    };
    limits.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let grammar = GrammarLimits {
        max_depth: args.max_schema_depth,
        compile_budget: Duration::from_millis(args.grammar_compile_ms),
    };
    Ok((limits, grammar))
}

/// Refuses scheduler settings the engine cannot run with, naming the flags.
fn validate_scheduler(config: &SchedulerConfig) -> anyhow::Result<()> {
    config.validate().map_err(|e| {
        anyhow::anyhow!(
            "{e} (flags --max-batch, --prefill-chunk, --max-step-tokens, --kv-cache-mib, \
             --kv-storage; EDGERUN_MAX_BATCH, EDGERUN_PREFILL_CHUNK, EDGERUN_MAX_STEP_TOKENS, \
             EDGERUN_KV_CACHE_MIB, EDGERUN_KV_STORAGE)"
        )
    })
}

/// The scheduler's settings: the flags given, over `defaults` (the device's); not validated,
/// and without a KV budget (each model's: `model_set::kv_budgets`, or the device's share).
fn scheduler_config(
    args: &ServeArgs,
    defaults: SchedulerConfig,
) -> anyhow::Result<SchedulerConfig> {
    let config = SchedulerConfig {
        max_batch_size: args.max_batch.unwrap_or(defaults.max_batch_size),
        max_queue: args.max_queue.unwrap_or(defaults.max_queue),
        prefill_chunk: args.prefill_chunk.unwrap_or(defaults.prefill_chunk),
        max_step_tokens: args.max_step_tokens.unwrap_or(defaults.max_step_tokens),
        kv_cache_budget: None,
        stalled_stream_timeout: Duration::from_secs(args.stalled_stream_secs),
        kv_storage: args.kv_storage.unwrap_or(defaults.kv_storage),
        device_sampling: !args.host_sampling,
        prefix_caching: !args.no_prefix_cache,
    };
    Ok(config)
}

fn serve(args: ServeArgs, threads: usize) -> anyhow::Result<()> {
    validate_settings(&args)?;
    // Before the listener, the model download and the weights: a machine that cannot run this
    // build says so in one line and exits 2.
    if let Some(passed) = preflight_or_exit(&args.device) {
        tracing::info!(device = ?args.device, "preflight passed: {}", passed.summary);
    }
    let tokens = load_tokens(&args)?;
    let access = load_access(&args)?;
    if tokens.is_empty() {
        if !args.listen.ip().is_loopback() && !args.insecure_no_auth {
            bail!(
                "no API token configured: refusing to listen on {} (not loopback). Set --api-token / EDGERUN_API_TOKENS, or pass --insecure-no-auth",
                args.listen
            );
        }
        tracing::warn!("no API token configured: requests are not authenticated");
    }
    let catalog = match &args.catalog {
        Some(p) => Catalog::parse(&std::fs::read_to_string(p)?)?,
        None => Catalog::builtin(),
    };
    let set = ModelSet::plan(&args.model, &args.served_as, &catalog)?;
    let generation = set.generation.clone();
    if generation.len() > 1 && args.tokenizer.is_some() {
        bail!(
            "--tokenizer (EDGERUN_TOKENIZER) is for a node with one text-generation model; this \
             one has {}",
            generation.len()
        );
    }
    // Each text-generation model's KV budget, refused now when the sizes given do not match.
    let kv_budgets = model_set::kv_budgets(&args.kv_cache_mib, generation.len())?;
    let mut state = AppState::new(Vec::new(), tokens);
    state.generators = Arc::new(
        generation
            .iter()
            .map(|g| GenerationSlot::new(g.names.clone(), g.description.clone()))
            .collect(),
    );
    state.embedders = Arc::new(
        set.embeddings
            .iter()
            .map(|e| EmbeddingSlot::new(e.names.clone(), e.description.clone()))
            .collect(),
    );
    let all_names = state.all_names();
    state.body = edgerun_server::BodyLimits {
        max_bytes: args.max_body_bytes,
        timeout: Duration::from_secs(args.body_timeout_secs),
        min_rate: args.min_body_rate,
        ..Default::default()
    };
    state.prepare = Arc::new(tokio::sync::Semaphore::new(
        args.prepare_threads.unwrap_or(threads),
    ));
    let limits = ConnectionLimits {
        max_connections: args.max_connections,
        header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        write_stall_timeout: Duration::from_secs(args.stalled_stream_secs),
    };
    state.heartbeat = Duration::from_secs(args.heartbeat_secs);
    (state.limits, state.grammar) = request_limits(&args)?;
    state.metrics = edgerun_server::telemetry::install();
    state.access = access;
    state.cors = edgerun_server::http_layers::CorsOrigins::parse(&args.cors_origins)
        .map_err(anyhow::Error::msg)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, models = ?all_names, "listening; /health is 503 until the models are loaded");

        // Keep the Access keys fresh in the background: requests never wait on a refresh.
        if let Some(access) = &state.access {
            access.spawn_refresher();
        }

        // Load on a blocking thread while the listener already answers /health with 503.
        let loading = load::Loading {
            generation: generation.clone(),
            embeddings: set.embeddings.clone(),
            generation_slots: state.generators.clone(),
            embed_slots: state.embedders.clone(),
            embed_config: EmbeddingConfig {
                max_batch_tokens: args.embed_batch_tokens,
                max_queue: args.embed_max_queue,
                max_request_tokens: args.embed_max_request_tokens,
            },
            settings: args.clone(),
            kv_budgets: kv_budgets.clone(),
            threads,
        };
        let loader = tokio::task::spawn_blocking(move || load::load_models(loading));

        // SIGTERM / Ctrl-C: drain (stop accepting, /health says draining, new requests 503),
        // then at the deadline cut what still runs.
        let (signalled, _) = tokio::sync::watch::channel(false);
        let signal_rx = signalled.subscribe();
        tokio::spawn(async move {
            shutdown_signal().await;
            signalled.send_replace(true);
        });
        let drain = state.drain.clone();
        let shutdown_timeout = Duration::from_secs(args.shutdown_timeout_secs);
        let graceful = {
            let drain = drain.clone();
            let mut rx = signal_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
                drain.start();
                tracing::info!(
                    "shutting down: no new connections, {}s for in-flight requests",
                    shutdown_timeout.as_secs()
                );
            }
        };
        let mut server = tokio::spawn(serve::serve(listener, router(state), limits, graceful));
        tokio::select! {
            loaded = loader => match loaded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.context("loading the models")),
                Err(e) => bail!("the model loader panicked: {e}"),
            },
            done = &mut server => {
                done.context("server failed")?;
                return Ok(());
            }
        }
        let mut rx = signal_rx.clone();
        tokio::select! {
            done = &mut server => return done.context("server failed"),
            _ = rx.wait_for(|s| *s) => {}
        }
        if tokio::time::timeout(shutdown_timeout, &mut server).await.is_err() {
            tracing::warn!("drain deadline reached: ending every generation still running");
            drain.cut();
            if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
                bail!(
                    "requests still in flight 5 s after the drain deadline's cut ({} cut); exiting",
                    drain.cut_requests()
                );
            }
        }
        match drain.cut_requests() {
            0 => {
                tracing::info!("drained; every request finished");
                Ok(())
            }
            n => bail!("shut down with {n} generation(s) cut at the drain deadline"),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
