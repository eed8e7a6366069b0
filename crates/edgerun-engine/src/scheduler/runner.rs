//! The model runner: one step's forward pass over the planned segments and its rows of
//! logits or tokens for the host.
//!
//! [`Runner::execute`] borrows each planned sequence's segment (and computes the grammar masks
//! of the constrained ones beside the forward pass, on a side thread), [`Runner::forward`]
//! turns the model's errors and panics into a [`StepError`] and rolls back what a failed pass
//! wrote to the caches, and [`Runner::rows`] dispatches sampling: on the device-first path
//! (paged storage with device sampling) the rows without an output format are sampled where the
//! logits are ([`crate::DeviceSampler`], built on first use) and only ids come back; every other
//! row is copied whole. [`sample_rows`] then samples the host's rows, on several threads when
//! they are many. [`Runner::probe`] runs one token on a scratch cache, to tell a broken device
//! from bad sequences. The runner knows nothing of queues, admission or stop rules: that is the
//! loop's (`mod.rs`).

use super::plan::Planned;
use super::stats::EngineStats;
use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::models::CausalLm;
use crate::sampling::DeviceRow;
use crate::sequence::Sequence;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Why a step, or one sequence's part of it, could not run. Internal to the scheduler: it
/// becomes the message of the sequence's `Failed` event, or of the engine's health, where it
/// leaves the engine thread.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    /// The model (or a tensor operation around it) returned an error.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// Copying the logits out (or sampling them on the device) failed.
    #[error("{0}")]
    Device(#[from] candle_core::Error),
    /// The forward pass panicked.
    #[error("the model panicked")]
    ModelPanicked,
    /// A sampler panicked (host sampling on several threads).
    #[error("sampling panicked")]
    SamplingPanicked,
    /// The sequence's output format cannot be followed (not an engine failure).
    #[error("{0}")]
    FormatUnmet(String),
}

/// What a step gives one sampling sequence: its logits, or (sampled on the device) the token
/// already chosen there, with its log-probabilities when they are reported.
pub(crate) enum Row {
    Logits(Vec<f32>),
    Token(u32, Option<crate::StepLogprobs>),
}

/// Runs the model for the loop: owns the device sampler, built when first needed.
pub(crate) struct Runner {
    pub model: Arc<dyn CausalLm>,
    pub stats: Arc<EngineStats>,
    /// Sample where the logits are: paged storage with [`super::SchedulerConfig::device_sampling`].
    pub device_sampling: bool,
    /// The batched sampler for the vocabulary, on the device, built when first needed.
    pub device_sampler: Option<crate::DeviceSampler>,
    #[cfg(feature = "fault-injection")]
    pub faults: Arc<std::sync::Mutex<crate::faults::Faults>>,
}

impl Runner {
    /// One token through the model on a scratch cache: does the device still work?
    pub fn probe(&mut self) -> Result<(), StepError> {
        let layout = self.model.kv_layout();
        let mut cache = KvCache::new(&layout, 1, self.model.device())?;
        let tokens = [0u32];
        let mut segments = vec![crate::models::Segment {
            tokens: &tokens,
            cache: &mut cache,
        }];
        self.forward(&mut segments, &[0], &[None]).map(|_| ())
    }

    /// Runs the model over the planned segments; returns the logits of the sampling entries,
    /// one row each, in plan order.
    pub fn execute(
        &mut self,
        running: &mut [Sequence],
        plan: &[Planned],
    ) -> Result<Vec<Row>, StepError> {
        let want: Vec<usize> = plan
            .iter()
            .enumerate()
            .filter(|(_, p)| p.samples)
            .map(|(k, _)| k)
            .collect();
        // The device-first path (paged storage) samples where the logits are; the CPU's
        // copies every row (a copy costs nothing there).
        let device = self.device_sampling;
        let on_device: Vec<Option<DeviceRow>> = plan
            .iter()
            .filter(|p| p.samples)
            .map(|p| {
                let seq = &mut running[p.seq];
                (device && seq.device_samplable()).then(|| seq.device_row())
            })
            .collect();
        // The plan is in sequence order with each sequence at most once, so the segments can
        // borrow the sequences one after the other.
        let mut segments = Vec::with_capacity(plan.len());
        let mut grammars = Vec::new();
        let mut rest: &mut [Sequence] = running;
        let mut offset = 0;
        for p in plan {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(p.seq - offset);
            let (seq, tail) = tail.split_first_mut().expect("a planned sequence exists");
            let (segment, grammar) = seq.segment(p.work);
            segments.push(segment);
            if let Some(grammar) = grammar.filter(|_| p.samples) {
                grammars.push(grammar);
            }
            rest = tail;
            offset = p.seq + 1;
        }
        if grammars.is_empty() {
            return self.forward(&mut segments, &want, &on_device);
        }
        // The masks of the tokens about to be sampled depend only on what each grammar has
        // consumed: compute them beside the forward pass, not after it.
        std::thread::scope(|scope| {
            let masks = std::thread::Builder::new()
                .name("edgerun-grammar".into())
                .spawn_scoped(scope, move || {
                    for grammar in grammars {
                        grammar.prepare_mask();
                    }
                });
            let logits = self.forward(&mut segments, &want, &on_device);
            match masks {
                // `prepare_mask` catches panics; a mask still missing is computed when sampled.
                Ok(handle) => drop(handle.join()),
                Err(e) => tracing::warn!(
                    "cannot start a grammar thread ({e}); masks computed when sampling"
                ),
            }
            logits
        })
    }

    /// The model's forward pass with its failures (errors and panics) as [`StepError`]s, the
    /// logits copied out.
    fn forward(
        &mut self,
        segments: &mut [crate::models::Segment<'_>],
        want: &[usize],
        on_device: &[Option<DeviceRow>],
    ) -> Result<Vec<Row>, StepError> {
        let _span = tracing::debug_span!("forward", segments = segments.len()).entered();
        let lens: Vec<usize> = segments.iter().map(|s| s.cache.len()).collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "fault-injection")]
            crate::faults::check(&self.faults, segments)?;
            let logits = self.model.forward(segments, want)?;
            #[cfg(feature = "fault-injection")]
            crate::faults::check_after(&self.faults, segments)?;
            Ok::<_, crate::EngineError>(logits)
        }));
        let logits = match result {
            Ok(Ok(logits)) => logits
                .map(|t| self.rows(&t, on_device))
                .transpose()
                .map_err(StepError::from),
            Ok(Err(e)) => Err(StepError::from(e)),
            Err(_) => Err(StepError::ModelPanicked),
        };
        match logits {
            Ok(rows) => Ok(rows.unwrap_or_default()),
            Err(e) => {
                // The model may have committed positions before it failed (its output layer,
                // or an asynchronous device error surfacing in the copy): forget them, so a
                // retry writes the same positions again.
                for (segment, len) in segments.iter_mut().zip(lens) {
                    segment.cache.roll_back_to(len);
                }
                Err(e)
            }
        }
    }

    /// The step's logits as rows for the host: the tokens of the `on_device` rows sampled
    /// where the logits are ([`crate::DeviceSampler`]), the others (and the rows the device
    /// hands back) copied whole.
    fn rows(
        &mut self,
        logits: &candle_core::Tensor,
        on_device: &[Option<DeviceRow>],
    ) -> candle_core::Result<Vec<Row>> {
        let device = logits.device();
        let pick = |idx: Vec<u32>| -> candle_core::Result<candle_core::Tensor> {
            let n = idx.len();
            logits.index_select(&candle_core::Tensor::from_vec(idx, n, device)?, 0)
        };
        let device_rows: Vec<u32> = (0..on_device.len() as u32)
            .filter(|&i| on_device[i as usize].is_some())
            .collect();
        let mut tokens = vec![None; on_device.len()];
        let mut logprobs: Vec<Option<crate::StepLogprobs>> = vec![None; on_device.len()];
        if !device_rows.is_empty() {
            let batch: Vec<DeviceRow> = on_device.iter().flatten().cloned().collect();
            let mut sample = || -> candle_core::Result<Vec<Option<u32>>> {
                #[cfg(feature = "fault-injection")]
                crate::faults::check_sampling(&self.faults)?;
                let sampler = match &mut self.device_sampler {
                    Some(s) => s,
                    empty => empty.insert(crate::DeviceSampler::new(logits.dim(1)?, device)?),
                };
                sampler.sample(&pick(device_rows.clone())?, &batch)
            };
            // A failure of the device sampler's own operations costs this step its copies,
            // not its sequences: the host samples every row (a device that is failing fails
            // the copies too, and the step is isolated as any other failure).
            match sample() {
                Ok(picked) => {
                    for (&i, t) in device_rows.iter().zip(picked) {
                        tokens[i as usize] = t;
                    }
                }
                Err(e) => tracing::warn!("device sampling failed ({e}); sampling on the host"),
            }
            // Rows reporting log-probabilities: computed here too, from the raw rows, for the
            // tokens just drawn; a row they cannot be computed for goes to the host whole
            // (which draws the same token with the same uniform).
            let reporting: Vec<(usize, u32, usize)> = on_device
                .iter()
                .enumerate()
                .filter_map(|(i, row)| Some((i, tokens[i]?, row.as_ref()?.top_logprobs?)))
                .collect();
            if !reporting.is_empty() {
                let sampler = self.device_sampler.as_ref().expect("built by the draw");
                let rows: Vec<u32> = reporting.iter().map(|r| r.0 as u32).collect();
                let chosen: Vec<u32> = reporting.iter().map(|r| r.1).collect();
                let top: Vec<usize> = reporting.iter().map(|r| r.2).collect();
                let computed = pick(rows).and_then(|raw| sampler.logprobs(&raw, &chosen, &top));
                let computed = computed.unwrap_or_else(|e| {
                    tracing::warn!("device log-probabilities failed ({e}); on the host");
                    vec![None; reporting.len()]
                });
                for (&(i, ..), lp) in reporting.iter().zip(computed) {
                    match lp {
                        Some(lp) => logprobs[i] = Some(lp),
                        None => tokens[i] = None,
                    }
                }
            }
            let sampled = tokens.iter().filter(|t| t.is_some()).count();
            let stats = &self.stats;
            stats.device_sampled.fetch_add(sampled, Ordering::Relaxed);
            let back = device_rows.len() - sampled;
            stats
                .device_rows_returned
                .fetch_add(back, Ordering::Relaxed);
        }
        let host_rows: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| tokens[i as usize].is_none())
            .collect();
        let mut full = match host_rows.len() {
            0 => Vec::new(),
            n if n == tokens.len() => logits.to_vec2::<f32>()?,
            _ => pick(host_rows)?.to_vec2::<f32>()?,
        }
        .into_iter();
        Ok(tokens
            .into_iter()
            .zip(logprobs)
            .map(|(t, lp)| match t {
                Some(t) => Row::Token(t, lp),
                None => Row::Logits(full.next().expect("one row per host row")),
            })
            .collect())
    }
}

/// Rows sampled at random (temperature above 0) from which a step samples on several threads:
/// such a row of a 128k vocabulary with top-p costs about 1 ms, so a GPU's batch of 64 would
/// hold the next step back by tens of ms on one thread. Fewer rows (and greedy rows, a mere
/// argmax) are cheaper than starting threads (measured on the 2-core CPU box: 8 greedy rows
/// on two threads lost ~10%).
const PARALLEL_SAMPLING_ROWS: usize = 16;

/// Each sampling sequence's token: taken from the row as the device picked it, or sampled from
/// its logits, on as many threads as the machine has when the rows are many (each sequence
/// samples with its own generator, so the threads change nothing but the time).
pub(super) fn sample_rows(
    running: &mut [Sequence],
    sampling: &[&Planned],
    rows: Vec<Row>,
) -> Vec<Result<u32, StepError>> {
    // The plan is in sequence order, each sequence once: pair each row with its sequence.
    let mut jobs: Vec<(&mut Sequence, Row)> = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter();
    let mut next = sampling.iter().map(|p| p.seq).peekable();
    for (i, seq) in running.iter_mut().enumerate() {
        if next.peek() == Some(&i) {
            next.next();
            jobs.push((seq, rows.next().expect("a row per sampling sequence")));
        }
    }
    let sample = |(seq, row): &mut (&mut Sequence, Row)| match row {
        Row::Logits(logits) => seq.sample(logits).map_err(StepError::FormatUnmet),
        Row::Token(token, logprobs) => {
            seq.sampled_on_device(logprobs.take());
            Ok(*token)
        }
    };
    let host_rows = jobs
        .iter()
        .filter(|(seq, r)| matches!(r, Row::Logits(_)) && seq.samples_at_random())
        .count();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(host_rows / 2);
    if host_rows < PARALLEL_SAMPLING_ROWS || threads < 2 {
        return jobs.iter_mut().map(sample).collect();
    }
    let per = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks_mut(per)
            .map(|chunk| {
                let n = chunk.len();
                let handle = scope.spawn(move || chunk.iter_mut().map(sample).collect::<Vec<_>>());
                (n, handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| match h.join() {
                Ok(tokens) => tokens,
                // A panic in a sampler fails its chunk's sequences, not the engine thread.
                Err(_) => (0..n).map(|_| Err(StepError::SamplingPanicked)).collect(),
            })
            .collect()
    })
}
