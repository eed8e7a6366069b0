//! Q5_K weights x Q8_K activations on the CPU (the `Q5_K_M` files' main format).
//!
//! Q5_K is Q4_K with a fifth bit per quant: the same 6-bit packed scales and mins, the same
//! `d * sc * q - dmin * m` per 32-value sub-block, so it runs the same tiles and the same
//! per-output float operations as [`super::q4_k`] (read in place, batched over the step's
//! tokens, bitwise row-invariant); only how a sub-block's quants are unpacked differs.
//!
//! Layout: GGML's 176-byte super-block (`d`, `dmin`: f16; `scales: [u8; 12]`;
//! `qh: [u8; 32]`, bit `s` of byte `l` the fifth bit of value `l` of sub-block `s`;
//! `qs: [u8; 128]`, the low 4 bits as in Q4_K).

use super::q4_k::scalar_rows;
use super::{cpu, forward_cpu, matmul_with, Activations, CpuMatrix, Ctx, InPlaceMatrix, QK_K};
use candle_core::quantized::k_quants::BlockQ5K as CandleQ5K;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// GGML's Q5_K super-block, the layout of candle's `BlockQ5K`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ5K {
    /// f16 bits.
    d: u16,
    /// f16 bits.
    dmin: u16,
    scales: [u8; 12],
    qh: [u8; QK_K / 8],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == std::mem::size_of::<CandleQ5K>());

/// A Q5_K weight matrix (n rows of k values, k % 256 == 0) on the CPU, read in place.
pub type Q5KMatrix = InPlaceMatrix<BlockQ5K>;

impl Q5KMatrix {
    /// `Some(..)` when `t` is a 2-D Q5_K tensor on the CPU with rows of a multiple of 256;
    /// `None` otherwise. Takes the tensor itself (no copy of the weights).
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        Self::new(t, GgmlDType::Q5K)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q5_k(lhs: &[f32], m: usize, w: &Q5KMatrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q5KMatrix {
    const NAME: &'static str = "Q5KMatrix";
    const ACTIVATIONS: Activations = Activations::Q8K;

    fn dims(&self) -> (usize, usize) {
        (self.rows(), self.cols())
    }

    fn blocks_addr(&self) -> usize {
        self.addr
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_rows<D: super::cpu::avx2::Dot>(ctx: &Ctx, rows: std::ops::Range<usize>) {
        super::q4_k::avx2::rows::<BlockQ5K, D>(ctx, rows)
    }

    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        // SAFETY: the mirror has candle's layout (asserted above).
        scalar_rows::<CandleQ5K>(ctx, rows)
    }
}

#[cfg(target_arch = "x86_64")]
impl super::q4_k::ScaleMinBlock for BlockQ5K {
    #[inline]
    fn d_dmin(&self) -> (u16, u16) {
        (self.d, self.dmin)
    }

    #[inline]
    fn packed_scales(&self) -> &[u8; 12] {
        &self.scales
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quants(&self, s: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let bits = _mm256_loadu_si256(self.qs.as_ptr().add(32 * (s / 2)) as *const __m256i);
        let bits = if s.is_multiple_of(2) {
            bits
        } else {
            _mm256_srli_epi16::<4>(bits)
        };
        let low = _mm256_and_si256(bits, _mm256_set1_epi8(0x0f));
        // Bit s of each qh byte, moved to bit 4 (bytes hold 0 or 1 before the shift, so the
        // 16-bit shift never carries into the neighbouring byte).
        let qh = _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i);
        let fifth = _mm256_and_si256(
            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32)),
            _mm256_set1_epi8(1),
        );
        _mm256_or_si256(low, _mm256_slli_epi16::<4>(fifth))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_k_quant_kernel;
    use super::*;

    #[test]
    fn matches_candle_in_place_and_row_invariant() {
        check_k_quant_kernel::<CandleQ5K, _>(
            GgmlDType::Q5K,
            |t| Q5KMatrix::from_qtensor(t).unwrap(),
            |w| w.addr,
        );
    }
}
