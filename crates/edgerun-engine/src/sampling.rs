//! Per-request token sampling with Workers AI's parameters.

use edgerun_protocol::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Chooses the next token of one sequence from its logits.
///
/// Order of operations (as in vLLM / Hugging Face): repetition penalty over prompt and output
/// tokens; frequency and presence penalties over output tokens (OpenAI's definition); then
/// temperature, top-k and top-p; `temperature == 0` is greedy. Each sampler owns its RNG, seeded
/// from `seed` when given, so a sequence's output does not depend on what else is in the batch.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each token generated so far.
    output_counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_tokens: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt_tokens: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let prompt_tokens = if params.repetition_penalty.is_some_and(|p| p != 1.0) {
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
            output_counts: HashMap::new(),
            prompt_tokens,
        }
    }

    /// Records a token that was generated (the penalties look at it from then on).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
    }

    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let temperature = self.params.temperature;
        if temperature <= 0.0 || self.params.top_k == Some(1) {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.params.top_k {
            candidates.truncate((k as usize).max(1));
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.params.top_p {
            if top_p < 1.0 {
                let mut acc = 0.0;
                let mut keep = probs.len();
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if acc >= top_p {
                        keep = i + 1;
                        break;
                    }
                }
                probs.truncate(keep.max(1));
                let sum: f32 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= sum);
            }
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        if let Some(rp) = self
            .params
            .repetition_penalty
            .filter(|&p| p != 1.0 && p > 0.0)
        {
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
        let freq = self.params.frequency_penalty.unwrap_or(0.0);
        let pres = self.params.presence_penalty.unwrap_or(0.0);
        if freq != 0.0 || pres != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= freq * n as f32 + pres;
                }
            }
        }
    }
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

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn zero_temperature_is_greedy() {
        let mut s = Sampler::new(params(0.0), &[]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn same_seed_same_choices() {
        let p = SamplingParams {
            seed: Some(42),
            temperature: 1.0,
            ..SamplingParams::default()
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
            SamplingParams {
                top_k: Some(1),
                temperature: 2.0,
                ..Default::default()
            },
            &[],
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits.clone()), 1);
        }
        let mut s = Sampler::new(
            SamplingParams {
                top_p: Some(0.0),
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
    fn penalties_push_seen_tokens_down() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: Some(2.0),
                ..Default::default()
            },
            &[],
        );
        s.observe(1);
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: Some(2.0),
                ..Default::default()
            },
            &[1],
        );
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0]), 2);
    }
}
