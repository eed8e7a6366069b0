//! Kernels: how a quantized weight matrix is applied to a batch of activations.
//!
//! # The seam
//!
//! A model never names a kernel. It asks for a [`QLinear`] ("this GGUF tensor as a linear
//! layer") and calls [`QLinear::forward`] on a `(tokens, k)` activation matrix. [`QLinear::new`]
//! decides, once at load time, which implementation serves that tensor:
//!
//! | weight                  | device | kernel                                              |
//! |-------------------------|--------|-----------------------------------------------------|
//! | Q4_1, 2-D, `k % 32 == 0` | CPU    | ours ([`q4_1`]: AVX2/FMA/F16C, portable fallback)   |
//! | anything else           | any    | candle's `QMatMul` (its CPU, CUDA and Metal kernels) |
//!
//! [`Kernels::CandleOnly`] forces candle's everywhere (the reference the parity tests compare
//! against).
//!
//! # Layout of this module
//!
//! * [`cpu`]: instruction-set detection (once, at run time), the check that the CPU has what
//!   the build assumed, and the thread pool; every CPU kernel dispatches on `cpu::isa()` and
//!   nothing else.
//! * one file per **block format**: [`q4_1`] (Q4_1 weights) and `q8_1` (Q8_1 activations, the
//!   left-hand side of the `*_1` formats). A new format (say Q4_K) is a new file with its
//!   block type, a matrix type holding the GGUF bytes as they are, and its kernels per ISA,
//!   plus one arm in [`QLinear::new`].
//! * **device kernels** (CUDA, Metal) are candle's today, through `QMatMul`. One of our own goes
//!   in a file here too (`cuda_*.rs`, compiled only with its feature) and gets its own
//!   [`QLinear`] variant; nothing outside this module changes.
//!
//! # Contract every kernel keeps
//!
//! * `forward` computes `xs @ W^T` like candle's `QMatMul::forward`, to float rounding.
//! * **Row invariance**: output row `i` depends only on input row `i` and the weights, bit for
//!   bit, whatever else is in the batch. The engine's promise that a sequence generates the same
//!   tokens alone or in any batch rests on it.
//! * No second copy of the weights: a kernel keeps the file's blocks (or reorders them once)
//!   and drops candle's tensor.
//!
//! Candle 0.11 also picks its quantized CPU kernels at run time (Q4_K repacks into tiles, Q6_K
//! switches kernel between batch 1 and larger batches); formats served by candle inherit those
//! choices, row invariance included or not.

pub mod cpu;
pub mod q4_1;
mod q8_1;

pub use q4_1::{matmul_q4_1, BlockQ4_1, Q4_1Matrix};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};
use std::sync::Arc;

/// Values per quantization block (Q4_1 and Q8_1 alike).
pub const QK: usize = 32;

/// Which matmul kernels a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our own where we have a faster one (Q4_1 on CPU), candle's elsewhere.
    #[default]
    Fastest,
    /// Candle's everywhere: the numerics of candle-transformers' `quantized_llama`, against
    /// which the forward pass is tested.
    CandleOnly,
}

/// A quantized weight matrix applied as `x @ W^T`, by whichever kernel serves its format on its
/// device.
pub enum QLinear {
    /// Q4_1 on the CPU: our SIMD kernel (candle 0.11 only has a scalar loop for it).
    Q4_1Cpu(Q4_1Matrix),
    /// Candle's quantized matmul: every other format, and every device kernel.
    Candle(QMatMul),
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Q4_1Cpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Candle(_) => write!(f, "QLinear::Candle"),
        }
    }
}

impl QLinear {
    /// The fastest kernel for `t` allowed by `kernels`.
    pub fn new(t: QTensor, kernels: Kernels) -> Result<Self> {
        if kernels == Kernels::Fastest {
            if let Some(m) = Q4_1Matrix::from_qtensor(&t)? {
                return Ok(Self::Q4_1Cpu(m));
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    /// A tensor that is also used elsewhere (tied input/output embeddings): candle's kernel over
    /// the shared tensor, so the weights are not held twice.
    pub fn shared(t: Arc<QTensor>) -> Result<Self> {
        Ok(Self::Candle(QMatMul::from_arc(t)?))
    }

    /// `xs @ W^T` for `xs` of shape `(..., k)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q4_1Cpu(m) => m.forward(xs),
            Self::Candle(m) => m.forward(xs),
        }
    }
}

/// Helpers the kernels' tests share.
#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic uniform values in [-1, 1).
    pub fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The largest element-wise difference between two outputs.
    pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
        got.iter()
            .zip(want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()))
    }
}
