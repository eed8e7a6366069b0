//! What every handler shares: [`AppState`] (each model's names and backend once it is ready,
//! the limits a request is held to, the prepare pool, Access and metrics), the node's shutdown
//! state [`Drain`], and how request bodies must arrive ([`BodyLimits`]). The backend is held
//! as a [`Backend`] trait object, so the routes run the same over the engine and over a fake.

use crate::backend::{Backend, EmbedBackend};
use crate::{access, telemetry, TokenSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// How a request body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_bytes: usize,
    /// The whole body must arrive within this (408 otherwise).
    pub timeout: Duration,
    /// After [`BodyLimits::grace`], the body must keep arriving at this many bytes per second
    /// (408 otherwise), so a trickle cannot hold a connection for the whole timeout.
    pub min_rate: usize,
    pub grace: Duration,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
            min_rate: 1024,
            grace: Duration::from_secs(5),
        }
    }
}

/// The node's shutdown state: draining (no new work), then, at the deadline, cut (every
/// generation still running ends with an error, and is counted).
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
    cut_requests: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            cut: watch::channel(false).0,
            cut_requests: AtomicUsize::new(0),
        }
    }
}

impl Drain {
    /// From now on `/health` says draining and new requests get 503.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The deadline has come: every generation still running ends now.
    pub fn cut(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.cut.send_replace(true);
    }

    /// Generations ended by [`Drain::cut`].
    pub fn cut_requests(&self) -> usize {
        self.cut_requests.load(Ordering::Relaxed)
    }

    /// Resolves when [`Drain::cut`] is called (at once if it was).
    pub(crate) fn cut_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.cut.subscribe();
        async move {
            if rx.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn note_cut(&self) {
        self.cut_requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::REQUESTS_CUT).increment(1);
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The text-generation models, each under its own names, in `--model` order (none on a
    /// node that serves embeddings alone).
    pub generators: Arc<Vec<GenerationSlot>>,
    pub tokens: TokenSet,
    /// How request bodies must arrive.
    pub body: BodyLimits,
    /// Bounds the CPU work before the engine (templating, tokenizing): at most this many
    /// prompts are prepared at once; the others wait, holding their queue place.
    pub prepare: Arc<Semaphore>,
    pub drain: Arc<Drain>,
    /// Idle time after which a stream gets an SSE comment, so proxies keep it open.
    pub heartbeat: Duration,
    /// Bounds on what a request carries (lists, schemas), checked by validation as the Worker
    /// checks them (`edgerun-protocol`'s `limits`).
    pub limits: edgerun_protocol::RequestLimits,
    /// How compiling a request's output format is bounded: its thread's stack (sized for
    /// `limits.schema.max_depth`) and time budget.
    pub grammar: edgerun_engine::GrammarLimits,
    /// Renders `/metrics`; `None` when this process has no recorder installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Cloudflare Access verification for the run routes; `None` (the default) turns it off.
    pub access: Option<Arc<access::AccessVerifier>>,
    /// Who may call from a browser (`--cors-origin`); `None` (the default) sends no CORS
    /// headers.
    pub cors: Option<crate::http_layers::CorsOrigins>,
    /// The embedding models this node serves beside the text-generation model, each under its
    /// own names, in `--model` order.
    pub embedders: Arc<Vec<EmbeddingSlot>>,
}

/// One text-generation model: its names (known at start) and its backend (set once the model
/// has loaded and warmed up; until then its run routes answer 503 and `/health` reports
/// loading).
pub struct GenerationSlot {
    /// Workers AI names such as `@cf/meta/llama-3-8b-instruct`, the model's own name, aliases.
    pub names: Vec<String>,
    /// What the model is, for the catalogue (`models/search`): the catalog's description, or
    /// the model file's name.
    pub description: String,
    pub backend: OnceLock<Arc<dyn Backend>>,
}

impl GenerationSlot {
    pub fn new(names: Vec<String>, description: String) -> Self {
        Self {
            names,
            description,
            backend: OnceLock::new(),
        }
    }
}

/// One embedding model: its names (known at start) and its backend (once loaded).
pub struct EmbeddingSlot {
    pub names: Vec<String>,
    /// What the model is, for the catalogue.
    pub description: String,
    pub backend: OnceLock<Arc<dyn EmbedBackend>>,
}

impl EmbeddingSlot {
    pub fn new(names: Vec<String>, description: String) -> Self {
        Self {
            names,
            description,
            backend: OnceLock::new(),
        }
    }
}

impl AppState {
    /// A node serving one text-generation model under `served_names` (none when empty), its
    /// backend not yet set.
    pub fn new(served_names: Vec<String>, tokens: TokenSet) -> Self {
        let generators = if served_names.is_empty() {
            Vec::new()
        } else {
            vec![GenerationSlot::new(
                served_names,
                "Text generation model served by edgerun".into(),
            )]
        };
        Self {
            generators: Arc::new(generators),
            tokens,
            body: BodyLimits::default(),
            prepare: Arc::new(Semaphore::new(2)),
            drain: Arc::new(Drain::default()),
            heartbeat: Duration::from_secs(15),
            limits: edgerun_protocol::RequestLimits::DEFAULT,
            grammar: edgerun_engine::GrammarLimits::DEFAULT,
            metrics: None,
            access: None,
            cors: None,
            embedders: Arc::new(Vec::new()),
        }
    }

    /// Hands the first text-generation model its backend (the engine once it is loaded, or a
    /// fake in tests); a second call, or a node without one, is refused (returns `false`).
    pub fn set_backend(&self, backend: impl Backend) -> bool {
        self.generators
            .first()
            .is_some_and(|slot| slot.backend.set(Arc::new(backend)).is_ok())
    }

    /// A place on the prepare pool (the CPU work before a backend: templating, tokenizing),
    /// waited for; it goes with the work it was taken for.
    pub(crate) async fn prepare_permit(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, crate::error::ServerError> {
        self.prepare
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| crate::error::ServerError::Task(e.to_string()))
    }

    /// The text-generation model `model` names, if it names one.
    pub fn generator(&self, model: &str) -> Option<&GenerationSlot> {
        self.generators
            .iter()
            .find(|slot| slot.names.iter().any(|n| n == model))
    }

    /// Whether `model` names a text-generation model.
    pub fn serves(&self, model: &str) -> bool {
        self.generator(model).is_some()
    }

    /// The embedding model `model` names, if it names one.
    pub fn embedder(&self, model: &str) -> Option<&EmbeddingSlot> {
        self.embedders
            .iter()
            .find(|slot| slot.names.iter().any(|n| n == model))
    }

    /// Whether a text-generation model is configured (a node may serve embeddings alone).
    pub fn has_generation_model(&self) -> bool {
        !self.generators.is_empty()
    }

    /// The loaded text-generation models' figures as the node's: `None` until all have loaded.
    pub fn generation_stats(&self) -> Option<edgerun_engine::StatsSnapshot> {
        let mut merged: Option<edgerun_engine::StatsSnapshot> = None;
        for slot in self.generators.iter() {
            let stats = slot.backend.get()?.stats();
            merged = Some(match merged {
                Some(m) => m.merge(stats),
                None => stats,
            });
        }
        merged
    }

    /// Every name the node answers to: each text-generation model's, then each embedding
    /// model's.
    pub fn all_names(&self) -> Vec<String> {
        let generation = self.generators.iter().flat_map(|slot| slot.names.iter());
        let embedding = self.embedders.iter().flat_map(|slot| slot.names.iter());
        generation.chain(embedding).cloned().collect()
    }
}
