//! Checks one device's forward pass against another's on the same GGUF: what
//! `edgerun check-device` runs (and `scripts/gpu-check.sh` on a GPU machine, CUDA against the
//! CPU). Nothing here is on the serving path.
//!
//! Three checks, each judged against exact-math expectations rather than bit equality, since two
//! devices' kernels quantize activations and order sums differently:
//!
//! 1. **Logits.** The reference greedily generates `steps` tokens from a prompt; the subject is
//!    teacher-forced with the same tokens, so one divergence cannot cascade, and at every step
//!    (prompt included) the largest absolute logit difference is taken.
//! 2. **Greedy tokens.** At every one of those steps the subject's argmax must be the
//!    reference's, except where the reference's top-2 margin is within the tie margin (a near tie,
//!    which a few tenths of quantization noise may flip; counted and reported, not failed).
//! 3. **Batching.** On the subject, `batch` different prompts decoded together for `steps` steps
//!    must give each prompt the tokens it gets alone (again up to near ties; a sequence is
//!    compared only up to its first near-tie flip, after which the histories differ).
//! 4. **Sampling.** The subject's logits of those steps, sampled where they are by
//!    [`DeviceSampler`] under several kinds of sampling (nucleus, top-k, both, the whole
//!    vocabulary, penalties; seeded), must give exactly the tokens the host [`Sampler`] draws
//!    from the same rows with the same seeds (rows the device hands back are counted).
//!
//! The report says what was measured; [`DeviceReport::passed`] applies the tolerance.

use crate::error::{EngineError, Result};
use crate::kv_cache::{KvCache, KvPool, KvStorage};
use crate::models::{CausalLm, Segment};
use crate::request::SamplingConfig;
use crate::sampling::{argmax, step_logprobs, DeviceSampler, Sampler};
use crate::{Kernels, LoadedModel};
use candle_core::Device;
use std::path::Path;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct DeviceCheck {
    /// Greedy tokens generated per prompt.
    pub steps: usize,
    /// Prompts decoded together in the batching check.
    pub batch: usize,
    /// Largest absolute logit difference accepted over every logit of every step, as a fraction
    /// of the largest |logit| the reference produced (scales differ: SmolLM2's reach 36, a
    /// random-weight model's 3). Two devices quantize activations differently (our CPU
    /// kernels to Q8_K or Q8_1, candle's CUDA ones to Q8_1): our CPU kernels and candle's
    /// differ by 2.6% of it on SmolLM2 Q4_1 and on a generated llama-3-mini Q4_K_M alike.
    pub logit_tolerance: f32,
    /// The top-2 margin, as the same fraction, under which a step is a near tie (either token
    /// may be picked).
    pub tie_margin: f32,
    /// How the subject stores its KV caches (what it serves with: paged on CUDA).
    pub storage: KvStorage,
}

impl Default for DeviceCheck {
    fn default() -> Self {
        Self {
            steps: 32,
            batch: 8,
            logit_tolerance: 0.05,
            tie_margin: 0.03,
            storage: KvStorage::Contiguous,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    /// The tolerances in logits (the fractions times `max_abs_logit`).
    pub logit_tolerance: f32,
    pub tie_margin: f32,
    /// Steps compared in the logits check (the prompt's last position plus each decoded token).
    pub steps: usize,
    /// Largest `|subject - reference|` over every logit of every step.
    pub max_logit_diff: f32,
    /// Mean `|subject - reference|` over every logit of every step.
    pub mean_logit_diff: f32,
    /// Largest `|reference|` logit seen (for scale).
    pub max_abs_logit: f32,
    /// Steps whose argmax differed where the reference's margin exceeded the tolerance.
    pub greedy_mismatches: Vec<usize>,
    /// Steps whose argmax differed at a near tie.
    pub greedy_near_ties: usize,
    /// Per prompt of the batching check: the first step its batched tokens differ from its solo
    /// tokens, when the solo run's margin there exceeded the tolerance.
    pub batch_mismatches: Vec<(usize, usize)>,
    /// Prompts of the batching check that flipped at a near tie (compared up to there).
    pub batch_near_ties: usize,
    pub batch: usize,
    /// Rows sampled in the sampling check, how many the device decided, and how many of those
    /// differ from the host sampler's token.
    pub sampled_rows: usize,
    pub sampled_on_device: usize,
    pub sampling_mismatches: usize,
    /// Rows whose log-probabilities (the chosen token and the top 5) the device computed for
    /// its tokens, and how many of those differ from the host's (another id, or a value off by
    /// more than [`LOGPROB_TOLERANCE`]).
    pub logprob_rows: usize,
    pub logprob_mismatches: usize,
}

/// How far a log-probability computed on the device may be from the host's (f32 sums of the
/// whole row in another order).
pub const LOGPROB_TOLERANCE: f32 = 1e-3;

impl DeviceReport {
    pub fn passed(&self) -> bool {
        self.max_logit_diff <= self.logit_tolerance
            && self.greedy_mismatches.is_empty()
            && self.batch_mismatches.is_empty()
            && self.sampling_mismatches == 0
            && self.sampled_on_device > 0
            && self.logprob_mismatches == 0
            && self.logprob_rows > 0
    }
}

impl std::fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = |ok: bool| if ok { "ok" } else { "FAILED" };
        writeln!(
            f,
            "logits:  max |diff| {:.4}, mean {:.5}, over {} steps (largest |logit| {:.2}; tolerance {:.3}): {}",
            self.max_logit_diff,
            self.mean_logit_diff,
            self.steps,
            self.max_abs_logit,
            self.logit_tolerance,
            verdict(self.max_logit_diff <= self.logit_tolerance)
        )?;
        writeln!(
            f,
            "greedy:  {} of {} steps differ beyond a near tie (margin {:.3}; {} near-tie flips): {}",
            self.greedy_mismatches.len(),
            self.steps,
            self.tie_margin,
            self.greedy_near_ties,
            verdict(self.greedy_mismatches.is_empty())
        )?;
        writeln!(
            f,
            "batch:   {} of {} prompts differ batched vs alone beyond a near tie ({} near-tie flips): {}",
            self.batch_mismatches.len(),
            self.batch,
            self.batch_near_ties,
            verdict(self.batch_mismatches.is_empty())
        )?;
        writeln!(
            f,
            "sample:  {} of {} rows decided on the device, {} differ from the host sampler: {}",
            self.sampled_on_device,
            self.sampled_rows,
            self.sampling_mismatches,
            verdict(self.sampling_mismatches == 0 && self.sampled_on_device > 0)
        )?;
        write!(
            f,
            "logprob: {} rows' log-probabilities (top 5) computed on the device, {} differ from the host's (tolerance {}): {}",
            self.logprob_rows,
            self.logprob_mismatches,
            LOGPROB_TOLERANCE,
            verdict(self.logprob_mismatches == 0 && self.logprob_rows > 0)
        )
    }
}

/// Loads `path` on the CPU (the reference) and on `subject`, and runs the three checks. When the
/// subject is the CPU too, the reference runs candle's kernels, so the check compares ours with
/// them. The prompts are fixed sentences (any file with a tokenizer will do, random weights too).
pub fn compare(path: &Path, subject: &Device, check: DeviceCheck) -> Result<DeviceReport> {
    let reference_kernels = if subject.is_cpu() {
        Kernels::CandleOnly
    } else {
        Kernels::Fastest
    };
    let reference = (&Device::Cpu, reference_kernels);
    let subject_device = subject.clone();
    let subject = (subject, Kernels::Fastest);
    let nonnegative = |x: f32| !x.is_nan() && x >= 0.0;
    if check.steps == 0
        || check.batch == 0
        || !nonnegative(check.logit_tolerance)
        || !nonnegative(check.tie_margin)
    {
        return Err(EngineError::Config(
            "device check: steps and batch must be at least 1, tolerances at least 0".into(),
        ));
    }
    let ref_model = LoadedModel::load_with(path, None, reference.0, reference.1)?;
    let sub_model = LoadedModel::load_with(path, None, subject.0, subject.1)?;
    let prompts = prompts(&ref_model, check.batch)?;
    let reference = Caches::new(
        &*ref_model.model,
        KvStorage::Contiguous,
        &prompts,
        check.steps,
    )?;
    let subject = Caches::new(&*sub_model.model, check.storage, &prompts, check.steps)?;
    let mut report = DeviceReport {
        batch: check.batch,
        ..Default::default()
    };

    // 1 and 2: teacher-forced logits.
    let reference_run = greedy(&*ref_model.model, &reference, &prompts[0], check.steps)?;
    let forced = forced_logits(
        &*sub_model.model,
        &subject,
        &prompts[0],
        &reference_run.tokens,
    )?;
    report.max_abs_logit = reference_run
        .logits
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()));
    report.logit_tolerance = check.logit_tolerance * report.max_abs_logit;
    report.tie_margin = check.tie_margin * report.max_abs_logit;
    report.steps = forced.len();
    let (mut sum, mut count) = (0f64, 0usize);
    for (step, (r, s)) in reference_run.logits.iter().zip(&forced).enumerate() {
        for (a, b) in r.iter().zip(s) {
            report.max_logit_diff = report.max_logit_diff.max((a - b).abs());
            sum += f64::from((a - b).abs());
            count += 1;
        }
        if argmax(s) != argmax(r) {
            if margin(r) > report.tie_margin {
                report.greedy_mismatches.push(step);
            } else {
                report.greedy_near_ties += 1;
            }
        }
    }

    report.mean_logit_diff = (sum / count.max(1) as f64) as f32;

    // 4: sampling where the logits are, against the host sampler.
    sampling(&forced, &subject_device, &mut report)?;

    // 3: batched against alone, on the subject.
    let alone = prompts
        .iter()
        .map(|p| greedy(&*sub_model.model, &subject, p, check.steps))
        .collect::<Result<Vec<_>>>()?;
    let together = greedy_batch(&*sub_model.model, &subject, &prompts, check.steps)?;
    for (i, (solo, batched)) in alone.iter().zip(&together).enumerate() {
        if let Some(step) = solo.tokens.iter().zip(batched).position(|(a, b)| a != b) {
            if margin(&solo.logits[step]) > report.tie_margin {
                report.batch_mismatches.push((i, step));
            } else {
                report.batch_near_ties += 1;
            }
        }
    }
    Ok(report)
}

/// Samples `rows` (logits) on `device` under several kinds of sampling and seeds, and on the
/// host from the same rows; counts what the device decided and where it differs.
fn sampling(rows: &[Vec<f32>], device: &Device, report: &mut DeviceReport) -> Result<()> {
    let vocab = rows.first().map_or(0, Vec::len);
    let kinds = [
        (0.7, 0, 0.9, 1.0, 0.0),
        (1.0, 40, 1.0, 1.0, 0.0),
        (0.5, 20, 0.8, 1.0, 0.0),
        (1.0, 0, 1.0, 1.0, 0.0),
        (0.3, 0, 1.0, 1.0, 0.0),
        (0.8, 0, 0.95, 1.3, 0.4),
        (0.0, 0, 1.0, 1.5, 0.5),
    ];
    let (mut host, mut batch, mut flat) = (Vec::new(), Vec::new(), Vec::new());
    for (k, &(temperature, top_k, top_p, repetition_penalty, frequency_penalty)) in
        kinds.iter().enumerate()
    {
        for (r, row) in rows.iter().enumerate().take(8) {
            let config = SamplingConfig {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                frequency_penalty,
                seed: (k * 100 + r) as u64,
                ..SamplingConfig::default()
            };
            let seen = [argmax(row), 1, 2];
            let (mut a, mut b) = (Sampler::new(config, &seen), Sampler::new(config, &seen));
            for &t in &seen[..2] {
                a.observe(t);
                b.observe(t);
            }
            host.push(a.sample(&mut row.clone()));
            batch.push(b.device_row());
            flat.extend_from_slice(row);
        }
    }
    let logits = candle_core::Tensor::from_vec(flat.clone(), (batch.len(), vocab), device)?;
    let sampler = DeviceSampler::new(vocab, device)?;
    let picked = sampler.sample(&logits, &batch)?;
    report.sampled_rows = picked.len();
    for (picked, want) in picked.iter().zip(host) {
        if let Some(token) = *picked {
            report.sampled_on_device += 1;
            if token != want {
                report.sampling_mismatches += 1;
            }
        }
    }
    // Log-probabilities of the tokens the device drew, from the same raw rows.
    let decided: Vec<usize> = (0..picked.len()).filter(|&i| picked[i].is_some()).collect();
    let chosen: Vec<u32> = decided.iter().filter_map(|&i| picked[i]).collect();
    let ids = candle_core::Tensor::from_vec(
        decided.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        decided.len(),
        device,
    )?;
    let computed = sampler.logprobs(
        &logits.index_select(&ids, 0)?,
        &chosen,
        &vec![5; decided.len()],
    )?;
    let close = |a: f32, b: f32| (a - b).abs() <= LOGPROB_TOLERANCE * b.abs().max(1.0);
    for ((&i, &token), got) in decided.iter().zip(&chosen).zip(computed) {
        let Some(got) = got else { continue };
        report.logprob_rows += 1;
        let want = step_logprobs(&flat[i * vocab..(i + 1) * vocab], token, 5);
        let same = got.chosen.0 == want.chosen.0
            && close(got.chosen.1, want.chosen.1)
            && got.top.len() == want.top.len()
            && got
                .top
                .iter()
                .zip(&want.top)
                .all(|(g, w)| g.0 == w.0 && close(g.1, w.1));
        if !same {
            report.logprob_mismatches += 1;
        }
    }
    Ok(())
}

/// The gap between the two largest logits.
fn margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    a - b
}

fn prompts(model: &LoadedModel, n: usize) -> Result<Vec<Vec<u32>>> {
    const TEXTS: [&str; 8] = [
        "The quick brown fox jumps over the lazy dog.",
        "Edge inference keeps latency low for users far from a data center.",
        "Write a haiku about rivers and stones",
        "In 1969 the first humans walked on the Moon, and",
        "fn main() { println!(\"hello\"); }",
        "Die Katze sitzt auf der Matte und",
        "A list of prime numbers: 2, 3, 5, 7, 11,",
        "Question: what is the capital of France? Answer:",
    ];
    (0..n)
        .map(|i| {
            // More prompts than texts: the same text, repeated i / 8 + 1 times (a longer prompt).
            let text = TEXTS[i % TEXTS.len()].repeat(i / TEXTS.len() + 1);
            let ids = model.tokenizer.encode(&text)?;
            if ids.is_empty() {
                return Err(EngineError::Config(
                    "device check: the tokenizer gave an empty prompt".into(),
                ));
            }
            Ok(ids)
        })
        .collect()
}

struct Run {
    /// Generated tokens.
    tokens: Vec<u32>,
    /// Logits each token was chosen from.
    logits: Vec<Vec<f32>>,
}

/// Where a model's caches come from: its own buffers, or a pool big enough for every prompt
/// of the batching check at once.
struct Caches(Option<KvPool>);

impl Caches {
    fn new(
        model: &dyn CausalLm,
        storage: KvStorage,
        prompts: &[Vec<u32>],
        steps: usize,
    ) -> Result<Self> {
        match storage {
            KvStorage::Contiguous => Ok(Self(None)),
            KvStorage::Paged { block_size } => {
                let blocks = prompts
                    .iter()
                    .map(|p| (p.len() + steps).div_ceil(block_size))
                    .sum();
                Ok(Self(Some(KvPool::new(
                    &model.kv_layout(),
                    blocks,
                    block_size,
                    model.device(),
                )?)))
            }
        }
    }

    fn cache(&self, model: &dyn CausalLm, positions: usize) -> Result<KvCache> {
        Ok(match &self.0 {
            Some(pool) => pool.cache(positions)?,
            None => KvCache::new(&model.kv_layout(), positions, model.device())?,
        })
    }
}

fn logits_rows(t: candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

fn step(model: &dyn CausalLm, segments: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>> {
    let want: Vec<usize> = (0..segments.len()).collect();
    let logits = model
        .forward(segments, &want)?
        .ok_or_else(|| EngineError::Config("the model returned no logits".into()))?;
    logits_rows(logits)
}

fn greedy(model: &dyn CausalLm, caches: &Caches, prompt: &[u32], steps: usize) -> Result<Run> {
    let mut cache = caches.cache(model, prompt.len() + steps)?;
    let mut run = Run {
        tokens: Vec::with_capacity(steps),
        logits: Vec::with_capacity(steps),
    };
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let mut seg = [Segment {
            tokens: &input,
            cache: &mut cache,
        }];
        let logits = step(model, &mut seg)?.remove(0);
        let token = argmax(&logits);
        run.tokens.push(token);
        run.logits.push(logits);
        input = vec![token];
    }
    Ok(run)
}

/// The subject's logits for the prompt and then each of `tokens` fed in turn (the last token is
/// not fed: its logits are the reference's last step).
fn forced_logits(
    model: &dyn CausalLm,
    caches: &Caches,
    prompt: &[u32],
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    let mut cache = caches.cache(model, prompt.len() + tokens.len())?;
    let mut out = Vec::with_capacity(tokens.len());
    let mut input = prompt.to_vec();
    for &token in tokens {
        let mut seg = [Segment {
            tokens: &input,
            cache: &mut cache,
        }];
        out.push(step(model, &mut seg)?.remove(0));
        input = vec![token];
    }
    Ok(out)
}

/// Every prompt decoded in one batch: one step reads all prompts, then one token each per step.
fn greedy_batch(
    model: &dyn CausalLm,
    from: &Caches,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut caches = prompts
        .iter()
        .map(|p| from.cache(model, p.len() + steps))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
    let mut tokens = vec![Vec::with_capacity(steps); prompts.len()];
    for _ in 0..steps {
        let mut segs: Vec<Segment<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(input, cache)| Segment {
                tokens: input,
                cache,
            })
            .collect();
        let logits = step(model, &mut segs)?;
        for (i, row) in logits.iter().enumerate() {
            let token = argmax(row);
            tokens[i].push(token);
            inputs[i] = vec![token];
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::margin;

    #[test]
    fn margin_is_the_top_two_gap() {
        assert_eq!(margin(&[1.0, 3.0, 2.5, -1.0]), 0.5);
        assert_eq!(margin(&[3.0, 3.0]), 0.0);
    }
}
