//! Sizing a GPU's memory: what the KV pool may take once the weights are loaded and the largest
//! step's activations are set aside.
//!
//! A paged pool is allocated whole at start, so whatever it takes is gone for activations. The
//! activations a step needs are not a fixed share of the card: they grow with the step's token
//! count (every weight applied to every token of the step), with the longest prefill chunk's
//! attention scores (`heads × chunk × context` values), and with the batched decode's gathered
//! history (`batch × longest history`). [`ActivationEstimate`] computes each from the model's
//! widths and the scheduler's limits, all in f32 as the forward pass holds them, and the budget
//! sets aside the largest kind of step plus the logits.
//!
//! The estimate is an upper bound of what is live at once inside one layer, not a measurement:
//! `edgerun_device_activation_peak_bytes` (the scheduler's measured high-water mark over the
//! weights and the pool) says how close it comes, and `scripts/gpu-check.sh` prints both.

use crate::kv_cache::KvLayout;
use crate::models::ModelConfig;

const F32: usize = 4;

/// The largest step the scheduler may compose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Tokens per step across all sequences.
    pub max_step_tokens: usize,
    /// Prompt tokens one sequence reads per step.
    pub prefill_chunk: usize,
    /// Sequences per step.
    pub max_batch: usize,
    /// The longest history a sequence attends over (the context window).
    pub context: usize,
}

/// Bytes of activations the largest steps need, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationEstimate {
    /// One layer's dense work over a full step: residual, norms, q/k/v, gate/up/down.
    pub dense: usize,
    /// The longest prefill chunk's attention over a full context: its history gathered and
    /// widened to f32, scores and their softmax.
    pub prefill_attention: usize,
    /// A full batch's decode attention over the longest history: gathered keys and values
    /// (the pool's dtype, then f32), scores and their softmax.
    pub decode_attention: usize,
    /// Logits of every sequence of a step, and the sampler's working copies.
    pub logits: usize,
}

impl ActivationEstimate {
    pub fn new(cfg: &ModelConfig, kv: &KvLayout, step: StepLimits) -> Self {
        let d = cfg.embedding_length;
        let f = cfg.feed_forward_length;
        let q = cfg.head_count * cfg.head_dim;
        let kvw = kv.row_width();
        let heads = cfg.head_count;
        let vocab = cfg.vocab_size.unwrap_or(0).max(1);
        let t = step.max_step_tokens;
        let chunk = step.prefill_chunk.min(t);
        let batch = step.max_batch.min(t);
        let ctx = step.context;
        let kv_bytes = kv.dtype.size_in_bytes();
        // Live at once within a layer: x, its norm, the attention output and its projection
        // (4d); q, k, v and their rotated copies (2q + 3kv, q read once more by the grouping);
        // gate, up and their product (3f); activations quantized for the matmuls (< f).
        let dense = t * (4 * d + 3 * q + 3 * kvw + 4 * f) * F32;
        // History gathered (pool dtype), made f32 and contiguous; scores, scaled and masked,
        // and the softmax: three copies of heads × chunk × context.
        let history = |positions: usize| 2 * positions * kvw * (kv_bytes + F32);
        let prefill_attention = history(ctx) + 3 * heads * chunk * ctx * F32;
        let decode_attention = history(batch * ctx) + 3 * heads * batch * ctx * F32;
        // The logits, their f32 copy, and the device sampler's sorted candidates.
        let logits = 3 * batch * vocab * F32;
        Self {
            dense,
            prefill_attention,
            decode_attention,
            logits,
        }
    }

    /// What to set aside: the largest kind of step plus the logits.
    pub fn total(&self) -> usize {
        self.dense
            .max(self.prefill_attention)
            .max(self.decode_attention)
            .saturating_add(self.logits)
    }
}

/// The KV pool's budget on a GPU with `free` of `total` bytes free once the weights are loaded:
/// `fraction` of the card in all, less what is in use (by us or anyone else), less the
/// activations set aside; zero when nothing is left.
pub fn gpu_kv_budget(free: usize, total: usize, fraction: f64, activations: usize) -> usize {
    let allowed = (total as f64 * fraction) as usize;
    let used = total.saturating_sub(free);
    allowed.saturating_sub(used).saturating_sub(activations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn llama3_8b() -> (ModelConfig, KvLayout) {
        let cfg = ModelConfig {
            architecture: "llama".into(),
            name: None,
            block_count: 32,
            embedding_length: 4096,
            feed_forward_length: 14336,
            head_count: 32,
            head_count_kv: 8,
            head_dim: 128,
            rope_dim: 128,
            rope_freq_base: 500000.0,
            rms_norm_eps: 1e-5,
            context_length: 8192,
            vocab_size: Some(128256),
            rope_linear_scale: 1.0,
            expert_count: 0,
        };
        let kv = KvLayout {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: DType::F16,
        };
        (cfg, kv)
    }

    const GPU_STEP: StepLimits = StepLimits {
        max_step_tokens: 4096,
        prefill_chunk: 2048,
        max_batch: 64,
        context: 8192,
    };

    #[test]
    fn llama3_8b_at_the_gpu_defaults() {
        let (cfg, kv) = llama3_8b();
        let e = ActivationEstimate::new(&cfg, &kv, GPU_STEP);
        // 4096 tokens × (16384 + 12288 + 3072 + 57344) × 4 bytes.
        assert_eq!(e.dense, 4096 * 89088 * 4);
        // Scores: 3 × 32 heads × 2048 × 8192 × 4 bytes = 6 GiB; history 2 × 8192 × 1024 × 6.
        assert_eq!(e.prefill_attention, (3 << 31) + 2 * 8192 * 1024 * 6);
        // 64 sequences at 8k: 512k positions of history, the largest kind of step here.
        assert_eq!(
            e.decode_attention,
            2 * 64 * 8192 * 1024 * 6 + 3 * 32 * 64 * 8192 * 4
        );
        assert_eq!(e.logits, 3 * 64 * 128256 * 4);
        assert_eq!(e.total(), e.decode_attention + e.logits);
        // ~6.3 GiB: not the 10% of an 80 GB card once assumed, and on a 24 GB card a third.
        let gib = e.total() as f64 / (1u64 << 30) as f64;
        assert!((6.0..7.0).contains(&gib), "{gib}");
    }

    #[test]
    fn smaller_limits_set_aside_less() {
        let (cfg, kv) = llama3_8b();
        let full = ActivationEstimate::new(&cfg, &kv, GPU_STEP).total();
        for smaller in [
            StepLimits {
                max_batch: 8,
                ..GPU_STEP
            },
            StepLimits {
                context: 2048,
                ..GPU_STEP
            },
            StepLimits {
                max_step_tokens: 512,
                prefill_chunk: 512,
                max_batch: 8,
                ..GPU_STEP
            },
        ] {
            assert!(
                ActivationEstimate::new(&cfg, &kv, smaller).total() < full,
                "{smaller:?}"
            );
        }
    }

    #[test]
    fn the_budget_is_the_fraction_less_what_is_used_less_the_activations() {
        let gib = 1usize << 30;
        // 80 GiB card, 5 GiB in use after loading, 90%: 72 - 5 - 8 = 59 GiB.
        assert_eq!(
            gpu_kv_budget(75 * gib, 80 * gib, 0.9, 8 * gib),
            72 * gib - 5 * gib - 8 * gib
        );
        // Nothing left is zero, never negative.
        assert_eq!(gpu_kv_budget(10 * gib, 80 * gib, 0.9, 8 * gib), 0);
        assert_eq!(gpu_kv_budget(70 * gib, 80 * gib, 0.9, 80 * gib), 0);
    }
}
