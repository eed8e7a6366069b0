//! Per-sequence token sampling over a resolved [`SamplingConfig`], and the log-probabilities
//! reported with a chosen token ([`step_logprobs`]).
//!
//! Two implementations of one definition: [`Sampler`] on the host, over a row of logits
//! copied out, and [`DeviceSampler`] over a whole step's rows where the logits are (the GPU
//! path), returning only token ids. Both take the same uniform draw from the sequence's own
//! generator ([`Sampler::device_row`]), so a seeded request picks the same tokens on either,
//! except where float rounding differs at a boundary (tested against each other).

pub mod device;

use crate::request::{Logprobs, SamplingConfig};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

pub use device::{DeviceRow, DeviceSampler, Penalty};

/// Chooses the next token of one sequence from its logits.
///
/// The definition (as in vLLM / Hugging Face), shared with [`DeviceSampler`]:
/// 1. repetition penalty over prompt and output tokens, then frequency and presence penalties
///    over output tokens (OpenAI's definition);
/// 2. `temperature <= 0` (or `top_k == 1`): the argmax, ties to the lowest id;
/// 3. otherwise the finite logits divided by the temperature, in the canonical order "most
///    likely first" (larger scaled logit first, ties to the lower id) whenever a cut applies;
///    top-k keeps the first `k`; weights are `exp(l - max)`; top-p keeps the shortest prefix
///    whose share of the mass (of the top-k set, or of the whole vocabulary) reaches `top_p`;
/// 4. one uniform `u` in `[0, 1)` from the sequence's generator picks the first candidate (in
///    that order, or in vocabulary order when nothing was cut) whose running weight exceeds
///    `u` times the candidates' total (running sums and totals in f64).
///
/// Each sampler owns its RNG, seeded from the config's seed, so a sequence's output does not
/// depend on what else is in the batch or on which implementation sampled it.
pub struct Sampler {
    params: SamplingConfig,
    rng: StdRng,
    /// The uniform drawn for the next token by [`Sampler::device_row`] and not used yet: a
    /// row the device hands back is finished with it, and a step that failed and is retried
    /// draws nothing new, so neither changes the sequence's output.
    pending: Option<f32>,
    /// Occurrences of each token generated so far.
    output_counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_tokens: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingConfig, prompt_tokens: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let prompt_tokens = if params.has_repetition_penalty() {
            let mut p = prompt_tokens.to_vec();
            p.sort_unstable();
            p.dedup();
            p
        } else {
            Vec::new()
        };
        Self {
            params,
            rng,
            pending: None,
            output_counts: HashMap::new(),
            prompt_tokens,
        }
    }

    /// What to report with each chosen token.
    pub fn logprobs(&self) -> Logprobs {
        self.params.logprobs
    }

    /// Whether sampling is greedy (after penalties, the argmax).
    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    /// Records a token that was generated (the penalties look at it from then on).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.pending = None;
    }

    /// The uniform for the next token: drawn once, kept until a token is sampled or observed.
    fn uniform(&mut self) -> f32 {
        let rng = &mut self.rng;
        *self.pending.get_or_insert_with(|| rng.random::<f32>())
    }

    /// The next token's sampling as [`DeviceSampler`] takes it: the parameters, the penalties
    /// as per-token edits, and the uniform (drawn here, from this sequence's generator; a
    /// row the device hands back is finished by [`Sampler::sample`] with the same uniform).
    pub fn device_row(&mut self) -> DeviceRow {
        let greedy = self.params.is_greedy();
        DeviceRow {
            temperature: if greedy { 0.0 } else { self.params.temperature },
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            u: if greedy { 0.0 } else { self.uniform() },
            penalties: self.penalties(),
            top_logprobs: match self.params.logprobs {
                Logprobs::Off => None,
                Logprobs::Report { top } => Some(top),
            },
        }
    }

    /// The penalties as one edit per token, by token: a divisor for the repetition penalty
    /// (`1`: none) and an amount subtracted after it.
    fn penalties(&self) -> Vec<Penalty> {
        let rp = self.params.repetition_penalty;
        let (freq, pres) = (self.params.frequency_penalty, self.params.presence_penalty);
        let mut edits = std::collections::BTreeMap::<u32, Penalty>::new();
        let none = |token| Penalty {
            token,
            divide: 1.0,
            subtract: 0.0,
        };
        if self.params.has_repetition_penalty() {
            for &token in self.prompt_tokens.iter().chain(self.output_counts.keys()) {
                edits.entry(token).or_insert_with(|| none(token)).divide = rp;
            }
        }
        if freq != 0.0 || pres != 0.0 {
            for (&token, &n) in &self.output_counts {
                edits.entry(token).or_insert_with(|| none(token)).subtract = freq * n as f32 + pres;
            }
        }
        edits.into_values().collect()
    }

    /// Chooses the next token from the model's `logits` (penalties are applied in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let u = self
            .pending
            .take()
            .unwrap_or_else(|| self.rng.random::<f32>());
        let temperature = self.params.temperature;
        // Work in O(vocab) where possible: a full sort of a 50k-128k vocabulary per token
        // costs milliseconds, a visible share of a decode step.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        // The canonical order: most likely first, ties to the lower id.
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k;
        let cut_k = k > 0 && k < candidates.len();
        if cut_k {
            candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            candidates.truncate(k);
            candidates.sort_unstable_by(by_logit_desc);
        }
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total = sum(&weights);
        let top_p = self.params.top_p;
        if top_p >= 1.0 {
            return draw(&candidates, &weights, total, u);
        }
        // Nucleus: the shortest prefix of the most likely tokens whose mass reaches top_p.
        // Sort only as many of the best candidates as needed (none when top-k sorted them),
        // widening the window until it holds the nucleus.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        let by_rank = |a: &usize, b: &usize| by_logit_desc(&candidates[*a], &candidates[*b]);
        let mut window = if cut_k {
            order.len()
        } else {
            64.min(order.len())
        };
        loop {
            if !cut_k {
                if window < order.len() {
                    order.select_nth_unstable_by(window - 1, by_rank);
                }
                order[..window].sort_unstable_by(by_rank);
            }
            let mut acc = 0.0;
            let mut keep = None;
            for (i, &j) in order[..window].iter().enumerate() {
                acc += f64::from(weights[j]);
                if acc / total >= f64::from(top_p) {
                    keep = Some(i + 1);
                    break;
                }
            }
            if let Some(keep) = keep.or((window == order.len()).then_some(window)) {
                let kept: Vec<(u32, f32)> = order[..keep].iter().map(|&j| candidates[j]).collect();
                let w: Vec<f32> = order[..keep].iter().map(|&j| weights[j]).collect();
                return draw(&kept, &w, sum(&w), u);
            }
            window = (window * 4).min(order.len());
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.params.has_repetition_penalty() {
            let rp = self.params.repetition_penalty;
            let seen = self
                .prompt_tokens
                .iter()
                .copied()
                .chain(self.output_counts.keys().copied());
            let mut done = std::collections::HashSet::new();
            for t in seen {
                if !done.insert(t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let freq = self.params.frequency_penalty;
        let pres = self.params.presence_penalty;
        if freq != 0.0 || pres != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= freq * n as f32 + pres;
                }
            }
        }
    }
}

/// The weights' total, summed in f64: the device sums in another order, and f32 sums of 128k
/// weights would differ between the two by more than a small token's weight.
fn sum(weights: &[f32]) -> f64 {
    weights.iter().map(|&w| f64::from(w)).sum()
}

/// The first candidate whose running weight (in f64) exceeds `u * total`; when rounding
/// leaves that beyond the last, the last candidate with any weight.
fn draw(candidates: &[(u32, f32)], weights: &[f32], total: f64, u: f32) -> u32 {
    let r = f64::from(u) * total;
    let mut acc = 0.0;
    for (c, w) in candidates.iter().zip(weights) {
        acc += f64::from(*w);
        if r < acc {
            return c.0;
        }
    }
    candidates
        .iter()
        .zip(weights)
        .rev()
        .find(|(_, &w)| w > 0.0)
        .map_or(candidates[0].0, |(c, _)| c.0)
}

/// A token id with its log-probability.
pub type IdLogprob = (u32, f32);

/// The log-probabilities of one step, by token id: the chosen token's and the `top` most likely
/// tokens' (most likely first; ties to the lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub chosen: IdLogprob,
    pub top: Vec<IdLogprob>,
}

/// The floor reported for a token the model gives no chance (a non-finite log-probability
/// cannot be written as JSON; OpenAI reports such tokens as -9999).
pub const MIN_LOGPROB: f32 = -9999.0;

/// A logit's log-probability given its row's log-sum-exp over finite logits, as reported:
/// within `[MIN_LOGPROB, 0]`, and `MIN_LOGPROB` where it is not finite.
pub(crate) fn logprob_of(logit: f32, log_total: f32) -> f32 {
    let lp = logit - log_total;
    if lp.is_finite() {
        lp.clamp(MIN_LOGPROB, 0.0)
    } else {
        MIN_LOGPROB
    }
}

/// Log-softmax of the raw `logits` at `chosen` and at the `top` largest logits (NaN counts as
/// `-inf`; largest first, ties to the lower id). O(vocab).
pub fn step_logprobs(logits: &[f32], chosen: u32, top: usize) -> StepLogprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    // Summed in f64, as the device sums it: f32 sums of a whole vocabulary in two orders
    // differ in the fourth decimal.
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|l| f64::from((l - max).exp()))
        .sum();
    let log_total = max + sum.ln() as f32;
    let logprob = |l: f32| logprob_of(l, log_total);
    let chosen_logit = logits
        .get(chosen as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let mut best: Vec<(u32, f32)> = Vec::new();
    let top = top.min(logits.len());
    if top > 0 {
        best = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l }))
            .collect();
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if top < best.len() {
            best.select_nth_unstable_by(top - 1, by_logit_desc);
            best.truncate(top);
        }
        best.sort_unstable_by(by_logit_desc);
    }
    StepLogprobs {
        chosen: (chosen, logprob(chosen_logit)),
        top: best.into_iter().map(|(i, l)| (i, logprob(l))).collect(),
    }
}

/// [`argmax`] of each row of `logits` (`(rows, vocab)`), computed where the logits are so
/// only the ids cross to the host (a GPU's step copies 4 bytes per sequence, not the
/// vocabulary). Ties go to the lowest index, as in [`argmax`]: among the positions equal to
/// the row's maximum, the one with the largest `lowest_first[i] = vocab - i` wins, which is
/// unique. `lowest_first` is [`argmax_weights`] for the vocabulary, built once.
pub fn device_argmax(logits: &Tensor, lowest_first: &Tensor) -> candle_core::Result<Vec<u32>> {
    let max = logits.max_keepdim(1)?;
    let at_max = logits.broadcast_eq(&max)?.to_dtype(DType::F32)?;
    at_max
        .broadcast_mul(lowest_first)?
        .argmax(1)?
        .to_vec1::<u32>()
}

/// `(1, vocab)`: `vocab - i` at position `i` (exact in f32 for any vocabulary under 2^24).
pub fn argmax_weights(vocab: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::arange(0u32, vocab as u32, device)?
        .to_dtype(DType::F32)?
        .affine(-1.0, vocab as f64)?
        .reshape((1, vocab))
}

/// Index of the largest logit; ties go to the lowest index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device argmax is the host's, ties and all.
    #[test]
    fn device_argmax_is_argmax_with_ties_to_the_lowest_index() {
        let vocab = 1000;
        let mut rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                (0..vocab)
                    .map(|i| ((i * 37 + r * 11) % 101) as f32 * 0.25 - 7.0)
                    .collect()
            })
            .collect();
        // Planted ties at the maximum, and a row of one value.
        rows[1][10] = 100.0;
        rows[1][900] = 100.0;
        rows[2][999] = 50.0;
        rows[3].iter_mut().for_each(|x| *x = -3.0);
        rows[4][0] = f32::INFINITY;
        rows[4][5] = f32::INFINITY;
        rows[5][500] = f32::NEG_INFINITY;
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (rows.len(), vocab), &Device::Cpu).unwrap();
        let w = argmax_weights(vocab, &Device::Cpu).unwrap();
        let got = device_argmax(&t, &w).unwrap();
        let want: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        assert_eq!(got, want);
        assert_eq!(&want[1..4], &[10, 999, 0]);
    }

    fn params(temperature: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            ..SamplingConfig::default()
        }
    }

    /// One uniform per token: a step that failed and is retried asks again and gets the same
    /// one; a row the device hands back is finished with it; the next token draws anew, in
    /// step with a sampler that never went through the device.
    #[test]
    fn each_token_draws_one_uniform_whichever_path_samples_it() {
        let p = SamplingConfig {
            seed: 5,
            temperature: 1.0,
            top_p: 0.9,
            ..SamplingConfig::default()
        };
        let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.61).sin() * 3.0).collect();
        let (mut device, mut host) = (Sampler::new(p, &[]), Sampler::new(p, &[]));
        for _ in 0..20 {
            let first = device.device_row();
            assert_eq!(device.device_row(), first, "a retry draws again");
            let token = device.sample(&mut logits.clone());
            assert_eq!(token, host.sample(&mut logits.clone()));
            device.observe(token);
            host.observe(token);
        }
        let next = device.device_row();
        assert_eq!(next.u, host.device_row().u);
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let p = SamplingConfig {
            seed: 42,
            temperature: 1.0,
            ..SamplingConfig::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(p, &[]);
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = vec![1.0, 5.0, 4.9, 0.0];
        let mut s = Sampler::new(
            SamplingConfig {
                top_k: 1,
                temperature: 2.0,
                ..Default::default()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone()), 1);
        }
        let mut s = Sampler::new(
            SamplingConfig {
                top_p: 0.0,
                temperature: 2.0,
                ..Default::default()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone()), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_its_cuts() {
        // Logits for probabilities ~ [0.5, 0.25, 0.125, 0.125].
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let count = |params: SamplingConfig| {
            let mut s = Sampler::new(params, &[]);
            let mut n = [0u32; 4];
            for _ in 0..4000 {
                n[s.sample(&mut logits.to_vec()) as usize] += 1;
            }
            n
        };
        let base = SamplingConfig {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let n = count(base);
        assert!(
            (1800..2200).contains(&n[0]) && (800..1200).contains(&n[1]),
            "{n:?}"
        );
        assert!(n[2] > 300 && n[3] > 300, "{n:?}");
        // top_p 0.7 keeps the two most likely (0.5 + 0.25 >= 0.7).
        let n = count(SamplingConfig { top_p: 0.7, ..base });
        assert_eq!(n[2] + n[3], 0, "{n:?}");
        assert!(n[0] > n[1] && n[1] > 0, "{n:?}");
        // top_k 3 drops one of the two least likely.
        let n = count(SamplingConfig { top_k: 3, ..base });
        assert!(n.iter().filter(|&&c| c == 0).count() == 1, "{n:?}");
    }

    #[test]
    fn nucleus_window_widens_over_a_flat_distribution() {
        // 1000 equally likely tokens: top_p 0.5 needs 500 of them, more than the first window.
        let logits = vec![0f32; 1000];
        let mut s = Sampler::new(
            SamplingConfig {
                temperature: 1.0,
                top_p: 0.5,
                seed: 9,
                ..Default::default()
            },
            &[],
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let t = s.sample(&mut logits.clone());
            // 500 tokens make half the mass, give or take float rounding.
            assert!(
                t <= 501,
                "token {t} outside the nucleus (ties go to lower ids)"
            );
            seen.insert(t);
        }
        assert!(seen.len() > 400, "{}", seen.len());
    }

    #[test]
    fn step_logprobs_are_a_log_softmax_with_the_top_sorted() {
        // Probabilities 0.5, 0.25, 0.125, 0.125.
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let lp = step_logprobs(&logits, 1, 3);
        assert_eq!(lp.chosen.0, 1);
        assert!((lp.chosen.1 - 0.25f32.ln()).abs() < 1e-5, "{lp:?}");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        // Ties go to the lower id.
        assert_eq!(ids, [0, 1, 2]);
        assert!((lp.top[0].1 - 0.5f32.ln()).abs() < 1e-5);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f32 = logits
            .iter()
            .map(|&l| step_logprobs(&logits, 0, 0).chosen.1 - logits[0] + l)
            .map(f32::exp)
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        // No alternatives asked for; more asked for than there are tokens.
        assert!(step_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(step_logprobs(&logits, 0, 10).top.len(), 4);
        // Impossible tokens get the floor, never a non-finite number.
        let lp = step_logprobs(&[0.0, f32::NEG_INFINITY, f32::NAN], 1, 3);
        assert_eq!(lp.chosen.1, MIN_LOGPROB);
        assert!(lp.top.iter().all(|t| t.1.is_finite() && t.1 <= 0.0));
        assert_eq!(lp.top[0], (0, 0.0));
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut s = Sampler::new(
            SamplingConfig {
                temperature: 0.0,
                presence_penalty: 2.0,
                ..Default::default()
            },
            &[],
        );
        s.observe(1);
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
        let mut s = Sampler::new(
            SamplingConfig {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[1],
        );
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
    }
}
