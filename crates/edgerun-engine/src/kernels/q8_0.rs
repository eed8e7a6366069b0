//! Q8_0 weights x Q8_0 activations on the CPU, batched over all of a step's tokens.
//!
//! # Why
//!
//! Q8_0 is the tied output layer of most small models (SmolLM2's 49,152 x 576 embedding: 30 MB)
//! and the whole of a Q8_0 file. Candle's kernel (AVX2 `vec_dot`) computes one lhs row against
//! the whole matrix at a time, so a step decoding 8 sequences reads the matrix 8 times; at 4
//! streams it was ~15% of a SmolLM2 step. Here each weight row is read once per call for every
//! lhs row (the tiling of [`super::q4_1`]).
//!
//! # Layout
//!
//! * Weights: GGML's 34-byte block (`d: f16, qs: [i8; 32]`, value `j` is `d * qs[j]`), read in
//!   place from the tensor candle loaded: [`Q8_0Matrix`] keeps that tensor (an `Arc`, shared
//!   with the embedding lookup when the embeddings are tied) and never copies the weights.
//! * Activations: quantized once per call into the Q8_1 scratch of `q8_1.rs`. Q8_1's quants and
//!   scale are Q8_0's (`d = amax / 127`, `q = round(x / d)`, the same IEEE operations as
//!   candle's `BlockQ8_0::from_float`); its sum term is unused here.
//!
//! # Numerics
//!
//! Per block: `d_w * d_x * Σ q_w q_x`, as candle's `vec_dot_q8_0_q8_0` computes it (AVX2:
//! `maddubs(|q_w|, sign(q_x, q_w))`, `madd` with ones, converted to f32, fused-multiply-added
//! with the broadcast exact product `d_w * d_x` into 8 lanes, summed at the end in a fixed
//! order). Every output is that same sequence of operations whichever tile computes it, so rows
//! are bitwise independent of the batch (see `kernels/mod.rs`).

use super::cpu::{self, f16_to_f32};
use super::q8_1::Q8Quants;
use super::{forward_cpu, matmul_with, CpuMatrix, Ctx, InPlaceMatrix, QK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// GGML's Q8_0 block: 32 values as `d * q` with 8-bit `q`; `d` is an IEEE half float, stored as
/// its bits. The layout of candle's `BlockQ8_0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale (f16 bits).
    pub d: u16,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// A Q8_0 weight matrix (n rows of k values, k % 32 == 0) on the CPU, read in place.
pub type Q8_0Matrix = InPlaceMatrix<BlockQ8_0>;

impl Q8_0Matrix {
    /// `Some(..)` when `t` is a 2-D Q8_0 tensor on the CPU; `None` for any other dtype, rank
    /// or device. Takes the tensor itself (no copy of the weights).
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        Self::new(t, GgmlDType::Q8_0)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q8_0(lhs: &[f32], m: usize, w: &Q8_0Matrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q8_0Matrix {
    const NAME: &'static str = "Q8_0Matrix";

    fn dims(&self) -> (usize, usize) {
        (self.rows(), self.cols())
    }

    fn blocks_addr(&self) -> usize {
        self.addr
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_rows<D: super::cpu::avx2::Dot>(ctx: &Ctx, rows: std::ops::Range<usize>) {
        avx2::rows::<D>(ctx, rows)
    }

    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        scalar_rows(ctx, rows)
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        neon::rows(ctx, rows)
    }
}

/// Portable kernel: the same per-block formula, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers and `rows` lie within `0..ctx.n`.
unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
    let (nb, m) = (ctx.nb, ctx.m);
    let qs = std::slice::from_raw_parts(ctx.qs as *const Q8Quants, m * nb);
    let d8 = std::slice::from_raw_parts(ctx.d8 as *const f32, m * nb);
    let w = std::slice::from_raw_parts(ctx.w as *const BlockQ8_0, ctx.n * nb);
    let out = ctx.out as *mut f32;
    for j in rows {
        let wrow = &w[j * nb..(j + 1) * nb];
        for i in 0..m {
            let x = &qs[i * nb..(i + 1) * nb];
            let mut sum = 0f32;
            for (b, (wb, q)) in wrow.iter().zip(x).enumerate() {
                let sumi: i32 = wb
                    .qs
                    .iter()
                    .zip(&q.0)
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                sum += sumi as f32 * (f16_to_f32(wb.d) * d8[b * m + i]);
            }
            *out.add(i * ctx.n + j) = sum;
        }
    }
}

/// The AVX2 kernels. Every output `(i, j)`: for each block `b`, `p` = the 8 i32 lanes of
/// `madd(maddubs(|w|, sign(x, w)), 1)` converted to f32, `acc = fma(p, broadcast(d_w * d_x),
/// acc)`; at the end `hsum(acc)`. The kernels differ only in how many outputs they interleave.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::{hsum, Dot};
    use super::{BlockQ8_0, Ctx, Q8Quants};
    use std::arch::x86_64::*;

    /// Lhs rows per tile of the tall kernel.
    const TALL: usize = 8;
    /// Lhs rows whose quants stay in cache while a work item's weight rows pass over them.
    const LHS_CHUNK: usize = 64;
    const _: () = assert!(LHS_CHUNK.is_multiple_of(TALL));
    /// Weight rows per call of the wide (m = 1) kernel.
    const WIDE: usize = 4;
    /// How many blocks ahead (240 x 34 bytes, ~8 KiB) the kernel prefetches its weight row, as
    /// Q4_1's does: SmolLM2's tied output layer (49152 x 576) at m = 1 went from 1.0-1.5 ms to
    /// 0.42-0.50 ms in `kernel_bench q8_0 1` (its 28 MB stay in this host's 32 MB L3 there).
    const PREFETCH: usize = 240;

    super::super::avx2_tile_driver!();

    /// Σ w * x of one block pair as 8 f32 lanes (each an exact integer); `aw = |w|`.
    #[inline(always)]
    unsafe fn dot_lanes<D: Dot>(aw: __m256i, w: __m256i, x: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(D::dot4(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, w)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_quants(blk: *const BlockQ8_0) -> __m256i {
        _mm256_loadu_si256((*blk).qs.as_ptr() as *const __m256i)
    }

    /// Lhs row `i` against weight rows `j..j + C`, one row at a time: unlike Q4_1, sharing each
    /// activation block across several weight rows costs more (gathering their f16 scales)
    /// than it saves; measured 1.18 ms against 0.8 ms for SmolLM2's 49152 x 576 output layer
    /// at m = 1 (`kernel_bench q8_0`).
    #[inline(always)]
    unsafe fn wide<D: Dot, const C: usize>(ctx: &Ctx, i: usize, j: usize) {
        for c in 0..C {
            tall::<D, 1>(ctx, i, j + c);
        }
    }

    /// Lhs rows `i..i + R` (`R <= 8`) against weight row `j`.
    #[inline(always)]
    unsafe fn tall<D: Dot, const R: usize>(ctx: &Ctx, i: usize, j: usize) {
        let (nb, m) = (ctx.nb, ctx.m);
        let wrow = (ctx.w as *const BlockQ8_0).add(j * nb);
        let q8 = ctx.qs as *const Q8Quants;
        let xrows: [*const Q8Quants; R] = std::array::from_fn(|r| q8.add((i + r) * nb));
        let d8 = (ctx.d8 as *const f32).add(i);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = wrow.add(b);
            _mm_prefetch::<_MM_HINT_T0>(wrow.wrapping_add(b + PREFETCH) as *const i8);
            let qw = load_quants(blk);
            let aw = _mm256_sign_epi8(qw, qw);
            let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(
                std::ptr::read_unaligned(blk as *const u16) as i32,
            ));
            let dw = _mm256_broadcastss_ps(dw);
            for r in 0..R {
                let x = _mm256_load_si256(xrows[r].add(b) as *const __m256i);
                let scale = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*d8.add(b * m + r)));
                acc[r] = _mm256_fmadd_ps(dot_lanes::<D>(aw, qw, x), scale, acc[r]);
            }
        }
        let out = ctx.out as *mut f32;
        for (r, a) in acc.into_iter().enumerate() {
            *out.add((i + r) * ctx.n + j) = hsum(a);
        }
    }
}

/// The NEON kernel: the portable kernel's formula for each output `(i, j)` (so its rows are
/// independent of the batch): per block the exact integer dot product (NEON's widening
/// multiplies) and `acc = fma(sumi, d_w * d_x, acc)`. Weight rows are prefetched as far ahead
/// as the x86 kernel's.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::cpu::f16_to_f32;
    use super::super::cpu::neon::{dot16, prefetch};
    use super::{BlockQ8_0, Ctx, Q8Quants};
    use std::arch::aarch64::*;

    const PREFETCH: usize = 240;

    /// # Safety
    /// As `CpuMatrix::neon_rows`.
    #[inline(always)]
    pub(super) unsafe fn rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        let (nb, m) = (ctx.nb, ctx.m);
        let w = ctx.w as *const BlockQ8_0;
        let qs = ctx.qs as *const Q8Quants;
        let d8 = ctx.d8 as *const f32;
        let out = ctx.out as *mut f32;
        for j in rows {
            let wrow = w.add(j * nb);
            for i in 0..m {
                let x = qs.add(i * nb);
                let mut acc = 0f32;
                for b in 0..nb {
                    if i == 0 {
                        prefetch(wrow.wrapping_add(b + PREFETCH) as *const u8);
                    }
                    let blk = &*wrow.add(b);
                    let (wq, q) = (blk.qs.as_ptr(), (*x.add(b)).0.as_ptr());
                    let sum = dot16(vdupq_n_s32(0), vld1q_s8(wq), vld1q_s8(q));
                    let sumi = vaddvq_s32(dot16(sum, vld1q_s8(wq.add(16)), vld1q_s8(q.add(16))));
                    acc = (sumi as f32).mul_add(f16_to_f32(blk.d) * *d8.add(b * m + i), acc);
                }
                *out.add(i * ctx.n + j) = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_q8_0_activation_kernel;
    use super::*;
    use candle_core::quantized::k_quants::BlockQ8_0 as CandleBlock;

    const SHAPES: [(usize, usize); 4] = [(1536, 576), (576, 1536), (4099, 576), (13, 64)];

    /// Against candle's own `vec_dot` and `QMatMul`, in place, batch-invariant, other dtypes
    /// not taken (`test_util`).
    #[test]
    fn matches_candle_in_place_and_batch_invariant() {
        check_q8_0_activation_kernel::<CandleBlock, _>(
            GgmlDType::Q8_0,
            &SHAPES,
            |t| Q8_0Matrix::from_qtensor(t).unwrap(),
            |w| w.addr,
            |w, x| w.forward(x).unwrap(),
        );
    }
}
