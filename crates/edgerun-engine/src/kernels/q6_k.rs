//! Q6_K weights x Q8_K activations on the CPU, batched over all of a step's tokens.
//!
//! # Why
//!
//! Q6_K is the output matrix of every `_M` file (Llama-3's 128,256 x 4,096) and `attn_v` /
//! `ffn_down` in a third of their layers. Candle 0.11 switches its Q6_K kernel between one token
//! and several (a repacked gemv at m = 1, another path above), so a sequence's logits differed
//! alone and in a batch, breaking the engine's batch-invariance promise for these files; its
//! m = 2 path also took 2.3x the m = 1 time. This kernel gives every output the same sequence of
//! operations whatever the batch, reads the weights in place (no repacked copy), and reads each
//! weight row once per call for every lhs row.
//!
//! # Status: dispatched (with the Q4_K kernel, `Q4_K_M` files whose rows are multiples of 256
//! run row-invariant kernels end to end)
//!
//! Measured 2026-12-01 on a 2-core AMD EPYC with AVX2 only (no AVX-512), 2 threads,
//! `kernel_bench q6_k`, 128256 x 1024, two runs: 1.01-1.30x candle at m = 1, 1.44-1.59x at
//! m = 2, 1.26-1.30x at 4, 1.21-1.49x at 8, 0.85-0.97x at 32, 0.91-1.10x at 128. An earlier session's machine had AVX-512 VNNI, where
//! candle's repacked tiles ran 2x ours at m = 32 (0.49x): there a 512-bit VNNI tile (`dpbusd`,
//! 16 lanes) keeping this per-output operation sequence is what this kernel still needs (the
//! integer sums would be the same, so the results would stay bitwise equal).
//!
//! # Layout
//!
//! * Weights: GGML's 210-byte super-block of 256 values (`ql: [u8; 128]` low 4 bits,
//!   `qh: [u8; 64]` high 2 bits, `scales: [i8; 16]` one per 16 values, `d: f16`; value =
//!   `d * scale * (q - 32)` with 6-bit `q`), read in place from candle's tensor.
//! * Activations: Q8_K (`q8_k.rs`), candle's own quantization.
//!
//! # Numerics
//!
//! Per super-block: for each of its 8 vectors of 32 values `sumi += madd(maddubs(q, x),
//! scales)` (exact i32 lanes of `q * x * scale`), then `sumi -= 32 * madd(bsums, scales)` (the
//! `-32` offset of the quants, from the activations' per-16 sums), then
//! `acc = fma(broadcast(d_w * d_x), f32(sumi), acc)`; at the end `hsum(acc)` in a fixed order. Every tile runs exactly this per output, so rows are bitwise independent of the
//! batch. The portable path is candle's own `vec_dot` per output (deterministic per output too).

#[cfg(target_arch = "x86_64")]
use super::q8_k::Q8KBlock;
use super::{cpu, forward_cpu, matmul_with, Activations, CpuMatrix, Ctx, InPlaceMatrix, QK_K};
use candle_core::quantized::k_quants::{BlockQ6K as CandleQ6K, BlockQ8K as CandleQ8K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// GGML's Q6_K super-block, the layout of candle's `BlockQ6K`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    /// f16 bits.
    d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == std::mem::size_of::<CandleQ6K>());

/// A Q6_K weight matrix (n rows of k values, k % 256 == 0) on the CPU, read in place.
pub type Q6KMatrix = InPlaceMatrix<BlockQ6K>;

impl Q6KMatrix {
    /// `Some(..)` when `t` is a 2-D Q6_K tensor on the CPU with rows of a multiple of 256;
    /// `None` otherwise. Takes the tensor itself (no copy of the weights).
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        Self::new(t, GgmlDType::Q6K)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q6_k(lhs: &[f32], m: usize, w: &Q6KMatrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q6KMatrix {
    const NAME: &'static str = "Q6KMatrix";
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
        avx2::rows::<D>(ctx, rows)
    }

    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        scalar_rows(ctx, rows)
    }
}

/// Portable kernel: candle's own dot product, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers and `rows` lie within `0..ctx.n`.
unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
    let (nb, m) = (ctx.nb, ctx.m);
    // SAFETY: the mirrors have candle's layouts (asserted above and in `q8_k.rs`).
    let x = std::slice::from_raw_parts(ctx.qs as *const CandleQ8K, m * nb);
    let w = std::slice::from_raw_parts(ctx.w as *const CandleQ6K, ctx.n * nb);
    let out = ctx.out as *mut f32;
    for j in rows {
        let wrow = &w[j * nb..(j + 1) * nb];
        for i in 0..m {
            *out.add(i * ctx.n + j) = CandleQ6K::vec_dot(nb * QK_K, wrow, &x[i * nb..(i + 1) * nb]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::{hsum, Dot};
    use super::super::cpu::f16_to_f32;
    use super::{BlockQ6K, Ctx, Q8KBlock};
    use std::arch::x86_64::*;

    /// Lhs rows per tile of the tall kernel (the unpacked super-block takes 16 registers).
    const TALL: usize = 8;
    /// Lhs rows whose quants stay in cache while a work item's weight rows pass over them.
    const LHS_CHUNK: usize = 64;
    const _: () = assert!(LHS_CHUNK.is_multiple_of(TALL));
    /// Weight rows per call of the wide (m = 1) kernel.
    const WIDE: usize = 4;

    super::super::avx2_tile_driver!();

    /// Lhs row `i` against weight rows `j..j + C`, one row at a time (the same sequence per
    /// output as `tall`).
    #[inline(always)]
    unsafe fn wide<D: Dot, const C: usize>(ctx: &Ctx, i: usize, j: usize) {
        for c in 0..C {
            tall::<D, 1>(ctx, i, j + c);
        }
    }

    /// A super-block's 8 vectors of 32 quants (values 0..63, in value order) and, for each,
    /// its two scales as 16 i16 lanes (8 per 16 values).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: &BlockQ6K) -> ([__m256i; 8], [__m256i; 8]) {
        let m4 = _mm256_set1_epi8(0x0f);
        let m2 = _mm256_set1_epi8(0x03);
        let mut q = [_mm256_setzero_si256(); 8];
        let mut sc = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.ql.as_ptr().add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.ql.as_ptr().add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.qh.as_ptr().add(32 * h) as *const __m256i);
            let high = |shift: i32| {
                let bits = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16::<2>(qh),
                    4 => _mm256_srli_epi16::<4>(qh),
                    _ => _mm256_srli_epi16::<6>(qh),
                };
                _mm256_slli_epi16::<4>(_mm256_and_si256(bits, m2))
            };
            q[4 * h] = _mm256_or_si256(_mm256_and_si256(ql0, m4), high(0));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), high(2));
            q[4 * h + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), high(4));
            q[4 * h + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), high(6));
            // Scales 8h..8h + 8 as i16, in both 128-bit lanes; vector 4h + k takes scale
            // 8h + 2k in every i16 of its low lane and 8h + 2k + 1 in its high lane (one
            // in-lane byte shuffle each, instead of two scalar broadcasts).
            let half = _mm_cvtepi8_epi16(_mm_loadl_epi64(
                blk.scales.as_ptr().add(8 * h) as *const __m128i
            ));
            let both = _mm256_set_m128i(half, half);
            for k in 0..4 {
                let lo = (4 * k) as i8;
                let hi = (4 * k + 2) as i8;
                let pick = _mm256_setr_epi8(
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    lo,
                    lo + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                    hi,
                    hi + 1,
                );
                sc[4 * h + k] = _mm256_shuffle_epi8(both, pick);
            }
        }
        (q, sc)
    }

    /// Lhs rows `i..i + R` (`R <= TALL`) against weight row `j`.
    #[inline(always)]
    unsafe fn tall<D: Dot, const R: usize>(ctx: &Ctx, i: usize, j: usize) {
        let nb = ctx.nb;
        let wrow = (ctx.w as *const BlockQ6K).add(j * nb);
        let x = ctx.qs as *const Q8KBlock;
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = &*wrow.add(b);
            let dw = f16_to_f32(blk.d);
            let (q, sc) = unpack(blk);
            // The 16 scales as i16, for the `-32` offset: Σ (q - 32) x = Σ q x - 32 Σ x, and
            // Σ x per 16 values is the activation block's `bsums`.
            let scales16 =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.scales.as_ptr() as *const __m128i));
            for (r, a) in acc.iter_mut().enumerate() {
                let xb = &*x.add((i + r) * nb + b);
                let mut sumi = _mm256_setzero_si256();
                for v in 0..8 {
                    let xv = _mm256_loadu_si256(xb.qs.as_ptr().add(32 * v) as *const __m256i);
                    sumi = D::dot4_scaled(sumi, q[v], xv, sc[v]);
                }
                let bsums = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, scales16));
                let sumi = _mm256_sub_epi32(sumi, offset);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), _mm256_cvtepi32_ps(sumi), *a);
            }
        }
        let out = ctx.out as *mut f32;
        for (r, a) in acc.into_iter().enumerate() {
            *out.add((i + r) * ctx.n + j) = hsum(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_k_quant_kernel;
    use super::*;

    #[test]
    fn matches_candle_in_place_and_row_invariant() {
        check_k_quant_kernel::<CandleQ6K, _>(
            GgmlDType::Q6K,
            |t| Q6KMatrix::from_qtensor(t).unwrap(),
            |w| w.addr,
        );
    }
}
