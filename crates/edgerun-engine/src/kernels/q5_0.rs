//! Q5_0 weights x Q8_0 activations on the CPU, batched over all of a step's tokens.
//!
//! # Why
//!
//! llama.cpp's K-quant schemes fall back to Q5_0 for matrices whose rows are not a multiple
//! of 256 (Q4_K_M, Q5_K_M): most of Qwen2.5-0.5B's (896-wide rows) and SmolLM2's (576) in
//! those files. Candle's Q5_0 kernel is a `vec_dot` per (lhs row, weight row) pair and was a
//! sixth of llama.cpp's prompt speed on a Qwen2.5-0.5B-shaped Q4_K_M (36.6 against 242 tok/s);
//! this is Q8_0's kernel (`q8_0.rs`: each weight row read once per call for every lhs row) with
//! Q5_0's blocks unpacked in registers.
//!
//! # Layout
//!
//! * Weights: GGML's 22-byte block (`d: f16, qh: [u8; 4], qs: [u8; 16]`): value `j < 16` is
//!   `d * ((qs[j] & 15 | bit j of qh << 4) - 16)`, value `j + 16` is `d * ((qs[j] >> 4 | bit
//!   j + 16 of qh << 4) - 16)`. Read in place from the tensor candle loaded (no copy).
//! * Activations: Q8_0's (the Q8_1 scratch of `q8_1.rs`, its sum term unused), as candle's
//!   Q5_0 `vec_dot` takes them.
//!
//! # Numerics
//!
//! Per block: `d_w * d_x * Σ q_w q_x` with `q_w` in [-16, 15], accumulated exactly as Q8_0's
//! kernel does (integer block sums, one fused multiply-add per block into 8 lanes, summed at
//! the end in a fixed order), so rows are bitwise independent of the batch.

use super::cpu::{self, f16_to_f32};
use super::q8_1::Q8Quants;
use super::{forward_cpu, matmul_with, CpuMatrix, Ctx, InPlaceMatrix, QK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// GGML's Q5_0 block: 32 values as `d * (q - 16)` with 5-bit `q`, its low four bits in `qs`
/// (value `j` in the low nibble of byte `j`, value `j + 16` in the high one) and its fifth in
/// bit `j` of `qh` (little-endian); `d` is an IEEE half float, stored as its bits. The layout
/// of candle's `BlockQ5_0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ5_0 {
    /// Scale (f16 bits).
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

impl BlockQ5_0 {
    /// The block's 32 weights as integers in [-16, 15].
    pub fn quants(&self) -> [i8; QK] {
        let qh = u32::from_le_bytes(self.qh);
        std::array::from_fn(|j| {
            let (lo, bit) = if j < QK / 2 {
                (self.qs[j] & 0x0F, (qh >> j) & 1)
            } else {
                (self.qs[j - QK / 2] >> 4, (qh >> j) & 1)
            };
            (lo | (bit as u8) << 4) as i8 - 16
        })
    }
}

/// A Q5_0 weight matrix (n rows of k values, k % 32 == 0) on the CPU, read in place.
pub type Q5_0Matrix = InPlaceMatrix<BlockQ5_0>;

impl Q5_0Matrix {
    /// `Some(..)` when `t` is a 2-D Q5_0 tensor on the CPU; `None` for any other dtype, rank
    /// or device. Takes the tensor itself (no copy of the weights).
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        Self::new(t, GgmlDType::Q5_0)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q5_0(lhs: &[f32], m: usize, w: &Q5_0Matrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q5_0Matrix {
    const NAME: &'static str = "Q5_0Matrix";

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
    let w = std::slice::from_raw_parts(ctx.w as *const BlockQ5_0, ctx.n * nb);
    let out = ctx.out as *mut f32;
    for j in rows {
        let wrow = &w[j * nb..(j + 1) * nb];
        for i in 0..m {
            let x = &qs[i * nb..(i + 1) * nb];
            let mut sum = 0f32;
            for (b, (wb, q)) in wrow.iter().zip(x).enumerate() {
                let sumi: i32 = wb
                    .quants()
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
    use super::{BlockQ5_0, Ctx, Q8Quants};
    use std::arch::x86_64::*;

    /// Lhs rows per tile of the tall kernel.
    const TALL: usize = 8;
    /// Lhs rows whose quants stay in cache while a work item's weight rows pass over them.
    const LHS_CHUNK: usize = 64;
    const _: () = assert!(LHS_CHUNK.is_multiple_of(TALL));
    /// Weight rows per call of the wide (m = 1) kernel.
    const WIDE: usize = 4;
    /// How many blocks ahead (~8 KiB, as Q8_0's kernel) the kernel prefetches its weight row.
    const PREFETCH: usize = 360;

    super::super::avx2_tile_driver!();

    /// Σ w * x of one block pair as 8 f32 lanes (each an exact integer); `aw = |w|`.
    #[inline(always)]
    unsafe fn dot_lanes<D: Dot>(aw: __m256i, w: __m256i, x: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(D::dot4(_mm256_setzero_si256(), aw, _mm256_sign_epi8(x, w)))
    }

    /// The block's 32 weights as i8 in [-16, 15] (ggml's `bytes_from_nibbles_32` and
    /// `bytes_from_bits_32`): the nibbles, with `0xF0` or-ed in where the fifth bit is clear
    /// (`q - 16` in two's complement).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_quants(blk: *const BlockQ5_0) -> __m256i {
        let qs = _mm_loadu_si128((*blk).qs.as_ptr() as *const __m128i);
        let nibbles = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs),
            _mm256_set1_epi8(0x0F),
        );
        let qh = std::ptr::read_unaligned((*blk).qh.as_ptr() as *const u32);
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit_set = _mm256_cmpeq_epi8(
            _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe)),
            _mm256_set1_epi64x(-1),
        );
        _mm256_or_si256(
            nibbles,
            _mm256_andnot_si256(bit_set, _mm256_set1_epi8(0xF0u8 as i8)),
        )
    }

    /// Lhs row `i` against weight rows `j..j + C`, one row at a time (as Q8_0's kernel).
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
        let wrow = (ctx.w as *const BlockQ5_0).add(j * nb);
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
/// independent of the batch): per block the weights unpacked to i8, the exact integer dot
/// product (NEON's widening multiplies) and `acc = fma(sumi, d_w * d_x, acc)`.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::cpu::f16_to_f32;
    use super::super::cpu::neon::{dot16, prefetch};
    use super::{BlockQ5_0, Ctx, Q8Quants};
    use std::arch::aarch64::*;

    const PREFETCH: usize = 360;

    /// # Safety
    /// As `CpuMatrix::neon_rows`.
    #[inline(always)]
    pub(super) unsafe fn rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        let (nb, m) = (ctx.nb, ctx.m);
        let w = ctx.w as *const BlockQ5_0;
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
                    let quants = blk.quants();
                    let (wq, q) = (quants.as_ptr(), (*x.add(b)).0.as_ptr());
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
    use candle_core::quantized::k_quants::BlockQ5_0 as CandleBlock;
    use candle_core::Device;

    /// Qwen2.5-0.5B's 896-wide rows (not a multiple of 256: why files hold Q5_0), a tall one
    /// past every tile edge, a tiny one; small enough for the aarch64 run under qemu. Every
    /// row an even number of blocks: candle's NEON reference (`vec_dot_q5_0_q8_0`) refuses odd
    /// ones.
    const SHAPES: [(usize, usize); 4] = [(608, 896), (896, 640), (4099, 128), (13, 64)];

    /// Against candle's own `vec_dot` and `QMatMul`, in place, batch-invariant, other dtypes
    /// not taken (`test_util`).
    #[test]
    fn matches_candle_in_place_and_batch_invariant() {
        check_q8_0_activation_kernel::<CandleBlock, _>(
            GgmlDType::Q5_0,
            &SHAPES,
            |t| Q5_0Matrix::from_qtensor(t).unwrap(),
            |w| w.addr,
            |w, x| w.forward(x).unwrap(),
        );
    }

    #[test]
    fn blocks_unpack_as_candle_dequantizes_them() {
        let qt = super::super::test_util::quantized(7, 256, 3, GgmlDType::Q5_0);
        let want: Vec<f32> = qt
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let data = qt.data().unwrap();
        let blocks: Vec<BlockQ5_0> = data
            .chunks_exact(22)
            .map(|c| BlockQ5_0 {
                d: u16::from_le_bytes([c[0], c[1]]),
                qh: [c[2], c[3], c[4], c[5]],
                qs: c[6..22].try_into().unwrap(),
            })
            .collect();
        let got: Vec<f32> = blocks
            .iter()
            .flat_map(|b| {
                let d = crate::kernels::cpu::f16_to_f32(b.d);
                b.quants().map(|q| f32::from(q) * d)
            })
            .collect();
        assert_eq!(got, want);
    }
}
