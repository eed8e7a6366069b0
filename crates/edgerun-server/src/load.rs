//! Loading every model of a node ([`load_models`], on a blocking thread while the listener
//! already answers `/health` with 503): each model's weights on a thread of its own, then the
//! KV budgets (the operator's, or the device's split evenly: [`default_kv_budget`]), then one
//! engine per text-generation model, each handed to its slot in the routes' state.

use crate::cli::ServeArgs;
use crate::{scheduler_config, validate_scheduler};
use anyhow::{bail, Context};
use edgerun_engine::{
    Embedder, EmbeddingConfig, EmbeddingModel, Engine, KvStorage, LoadedModel, SchedulerConfig,
};
use edgerun_server::model_set::{self, PlannedModel};
use edgerun_server::{EmbeddingSlot, GenerationSlot};
use std::sync::Arc;

/// What loading needs, resolved at start.
pub(crate) struct Loading {
    pub generation: Vec<PlannedModel>,
    pub embeddings: Vec<PlannedModel>,
    pub generation_slots: Arc<Vec<GenerationSlot>>,
    pub embed_slots: Arc<Vec<EmbeddingSlot>>,
    pub embed_config: EmbeddingConfig,
    pub settings: ServeArgs,
    /// Each text-generation model's KV budget from `--kv-cache-mib` (`None`: the device's
    /// share).
    pub kv_budgets: Vec<Option<usize>>,
    pub threads: usize,
}

/// Loads every model and hands each its slot; an error names the model.
pub(crate) fn load_models(loading: Loading) -> anyhow::Result<()> {
    let Loading {
        generation,
        embeddings: embedders,
        generation_slots,
        embed_slots,
        embed_config,
        settings,
        kv_budgets,
        threads,
    } = loading;
    let device = settings.device.clone();
    let tokenizer = settings.tokenizer.clone();
    let started = std::time::Instant::now();
    let device = device.open()?;
    let used_before_weights = edgerun_engine::device_memory(&device).map(|(f, t)| t - f);
    // Every model's weights load on a thread of its own; the KV budgets are sized once
    // they are all in (model_set.rs).
    let loading_embedders: Vec<_> = embedders
        .iter()
        .map(|e| {
            let (path, name, device) = (e.path.clone(), e.names[0].clone(), device.clone());
            std::thread::spawn(move || -> anyhow::Result<Embedder> {
                let model = EmbeddingModel::load(&path, &device)
                    .with_context(|| format!("loading the embedding model {name}"))?;
                Embedder::start(model, embed_config)
                    .with_context(|| format!("starting the embedding model {name}"))
            })
        })
        .collect();
    let loading: Vec<_> = generation
        .iter()
        .map(|g| {
            let (path, name, device) = (g.path.clone(), g.names[0].clone(), device.clone());
            let tokenizer = tokenizer.clone();
            std::thread::spawn(move || -> anyhow::Result<LoadedModel> {
                LoadedModel::load(&path, tokenizer.as_deref(), &device)
                    .with_context(|| format!("loading the model {name}"))
            })
        })
        .collect();
    let mut loaded = Vec::with_capacity(loading.len());
    for (handle, planned) in loading.into_iter().zip(&generation) {
        loaded.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("the loader of {} panicked", planned.names[0]))??,
        );
    }
    let mut embed_reserve = 0;
    for ((slot, handle), planned) in embed_slots.iter().zip(loading_embedders).zip(&embedders) {
        let embedder = handle
            .join()
            .map_err(|_| anyhow::anyhow!("the loader of {} panicked", planned.names[0]))??;
        let info = embedder.info().clone();
        embed_reserve += embedder.activation_bytes();
        tracing::info!(
            model = %planned.path.display(),
            names = ?slot.names,
            dimensions = info.dimensions,
            max_input_tokens = info.max_tokens,
            pooling = info.pooling.as_str(),
            kernels = embedder.kernels(),
            "embedding model loaded"
        );
        let _ = slot.backend.set(Arc::new(embedder));
    }
    if loaded.is_empty() {
        return Ok(());
    }
    let mut scheduler = scheduler_config(&settings, SchedulerConfig::default_for(&device))?;
    let windows: Vec<Option<usize>> = generation
        .iter()
        .map(|g| settings.context_window.or(g.resolved.context_window))
        .collect();
    // The device's KV budget for every text-generation model together, unless the
    // operator sized each (`--kv-cache-mib`).
    let device_budget = if kv_budgets.iter().all(Option::is_some) {
        None
    } else {
        let gpu = match edgerun_engine::device_memory(&device) {
            Some((free, total)) if !device.is_cpu() => {
                // What the largest step of each model needs (device/memory.rs), and
                // each embedder's largest batch.
                let activations: usize = loaded
                    .iter()
                    .zip(&windows)
                    .map(|(model, window)| {
                        let config = model.model.config();
                        edgerun_engine::ActivationEstimate::new(
                            config,
                            &model.model.kv_layout(),
                            edgerun_engine::StepLimits {
                                max_step_tokens: scheduler.max_step_tokens,
                                prefill_chunk: scheduler.prefill_chunk,
                                max_batch: scheduler.max_batch_size,
                                context: window.unwrap_or(config.context_length),
                            },
                        )
                        .total()
                    })
                    .sum();
                Some(GpuMemory {
                    free,
                    total,
                    reserve: activations + embed_reserve,
                    weights: used_before_weights
                        .map(|before| (total - free).saturating_sub(before)),
                })
            }
            _ => None,
        };
        default_kv_budget(&settings, &mut scheduler, device.is_cpu(), gpu)?
    };
    let mut pool_bytes = 0;
    for (((model, slot), budget), (planned, window)) in loaded
        .into_iter()
        .zip(generation_slots.iter())
        .zip(&kv_budgets)
        .zip(generation.iter().zip(&windows))
    {
        let mut config = scheduler;
        config.kv_cache_budget =
            budget.or(device_budget.map(|b| model_set::even_share(b, kv_budgets.len())));
        validate_scheduler(&config).with_context(|| format!("the model {}", planned.names[0]))?;
        let cfg = model.model.config().clone();
        let kv_layout = model.model.kv_layout();
        let engine = Engine::start(model, config, *window)
            .with_context(|| format!("starting the model {}", planned.names[0]))?;
        if let KvStorage::Paged { block_size } = config.kv_storage {
            pool_bytes += engine.stats().kv_pool_total_blocks * kv_layout.bytes_for(block_size);
        }
        tracing::info!(
            model = %planned.path.display(),
            names = ?slot.names,
            architecture = %cfg.architecture,
            device = ?device,
            layers = cfg.block_count,
            context_window = engine.context_window(),
            kv_cache_budget_mib = config.kv_cache_budget.map(|b| b >> 20),
            max_batch = config.max_batch_size,
            max_step_tokens = config.max_step_tokens,
            threads,
            secs = started.elapsed().as_secs_f32(),
            "model loaded and warmed up"
        );
        let _ = slot.backend.set(Arc::new(engine));
    }
    if matches!(scheduler.kv_storage, KvStorage::Paged { .. }) {
        metrics::gauge!("edgerun_kv_pool_bytes").set(pool_bytes as f64);
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn mem_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A GPU's memory once every model's weights are in.
struct GpuMemory {
    free: usize,
    total: usize,
    /// Set aside for activations: every text-generation model's largest step, every
    /// embedder's largest batch.
    reserve: usize,
    /// What the weights took, when the driver's count before them is known.
    weights: Option<usize>,
}

/// The KV budget the device gives every text-generation model together (split evenly among
/// them by the caller), sized once every model's weights are in: on the CPU a share of the
/// memory available now (a quarter for a paged pool, half for contiguous caches); on a GPU
/// what `--gpu-memory-fraction` leaves beyond the weights and the activations' reserve.
/// `None` where nothing bounds it (the CPU without `/proc/meminfo`: contiguous caches then,
/// without a prefix cache; a device whose memory cannot be read).
fn default_kv_budget(
    settings: &ServeArgs,
    scheduler: &mut SchedulerConfig,
    is_cpu: bool,
    gpu: Option<GpuMemory>,
) -> anyhow::Result<Option<usize>> {
    let paged = matches!(scheduler.kv_storage, KvStorage::Paged { .. });
    if is_cpu && paged {
        // The pool is reserved whole but its pages are touched only as blocks are first used;
        // the prefix cache keeps blocks until the pool needs them, so in time it does use all
        // of it: a quarter of what is available now.
        return match mem_available_bytes() {
            Some(available) => Ok(Some(available / 4)),
            None if settings.kv_storage.is_some() => bail!(
                "--kv-storage paged on the CPU needs --kv-cache-mib (EDGERUN_KV_CACHE_MIB) \
                 where /proc/meminfo cannot be read"
            ),
            None => {
                tracing::warn!(
                    "cannot read /proc/meminfo to size a KV pool: per-sequence KV caches \
                     without a prefix cache (set --kv-cache-mib for one)"
                );
                scheduler.kv_storage = KvStorage::Contiguous;
                Ok(None)
            }
        };
    }
    if is_cpu {
        // On the CPU, KV caches share RAM with everything else: by default let them reserve at
        // most half of what is available now, so a burst of long requests queues instead of
        // getting the process killed.
        return Ok(mem_available_bytes().map(|b| b / 2));
    }
    let Some(GpuMemory {
        free,
        total,
        reserve,
        weights,
    }) = gpu
    else {
        return Ok(None);
    };
    if let Some(weights) = weights {
        metrics::gauge!("edgerun_device_weights_bytes").set(weights as f64);
    }
    let budget = edgerun_engine::gpu_kv_budget(free, total, settings.gpu_memory_fraction, reserve);
    tracing::info!(
        used_after_weights_mib = (total - free) >> 20,
        total_mib = total >> 20,
        activation_reserve_mib = reserve >> 20,
        kv_pool_mib = budget >> 20,
        "GPU memory plan"
    );
    metrics::gauge!("edgerun_device_activation_reserve_bytes").set(reserve as f64);
    if budget == 0 {
        bail!(
            "no GPU memory left for the KV cache: {} MiB free of {} MiB once the weights are \
             loaded, --gpu-memory-fraction {} allows {} MiB in all, and the largest steps' \
             activations need {} MiB (lower --max-step-tokens, --prefill-chunk or --max-batch, \
             or set --kv-cache-mib)",
            free >> 20,
            total >> 20,
            settings.gpu_memory_fraction,
            ((total as f64 * settings.gpu_memory_fraction) as usize) >> 20,
            reserve >> 20
        );
    }
    Ok(Some(budget))
}
