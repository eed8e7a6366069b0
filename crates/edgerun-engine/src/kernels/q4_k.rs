//! Q4_K weights x Q8_K activations on the CPU, batched over all of a step's tokens; and the
//! tile every "scale and min" K-quant (Q4_K, Q5_K) shares.
//!
//! # Why
//!
//! Q4_K is most of a `Q4_K_M` file (every `attn_q/k/o`, `ffn_gate/up`, and `attn_v`/`ffn_down`
//! in two thirds of the layers): the format most users download. Candle 0.11 repacks each
//! Q4_K tensor into interleaved tiles when a `QMatMul` is made, and keeps the repacked copy
//! beside the file's blocks, so the weights sit in memory twice. This kernel reads the file's
//! blocks in place, reads each weight row from memory once per call for every lhs row, and gives every
//! output the same sequence of operations whatever the batch (bitwise row invariance).
//!
//! # Layout
//!
//! * Weights: GGML's 144-byte super-block of 256 values (`d`, `dmin`: f16; `scales: [u8; 12]`,
//!   eight 6-bit scales and eight 6-bit mins packed; `qs: [u8; 128]`, 4-bit quants). Value
//!   `l` of sub-block `s` (32 values) is `d * sc[s] * q - dmin * m[s]`. In `qs`, the 32 bytes
//!   of group `g` hold sub-block `2g` in their low nibbles and `2g + 1` in their high ones.
//! * Activations: Q8_K (`q8_k.rs`): `d`, 256 `i8`, and `bsums` (sums per 16 values).
//!
//! # Numerics (per output, whatever the batch)
//!
//! Per super-block: `sumi = Σ_s madd(maddubs(q_s, x_s), sc[s])` (exact i32 lanes of
//! `q * x * sc`) and `acc = fma(d_w * d_x, f32(sumi), acc)` (8 lanes); the min term
//! `summ = Σ_s m[s] Σ x_s` (an exact integer, from the activations' sub-block sums) goes into
//! `acc_m = fma(-dmin_w * d_x, f32(summ), acc_m)`, one lane per output. The output is
//! `hsum(acc) + acc_m`. Only the float operations need a fixed order: the integer sums are
//! exact however they are interleaved, so tiles of 1 to 8 lhs rows give every output the same
//! bits. The portable path is candle's own `vec_dot` per output (deterministic per output too).

#[cfg(target_arch = "x86_64")]
use super::q8_k::Q8KBlock;
use super::{cpu, forward_cpu, matmul_with, Activations, CpuMatrix, Ctx, InPlaceMatrix, QK_K};
use candle_core::quantized::k_quants::{BlockQ4K as CandleQ4K, BlockQ8K as CandleQ8K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// GGML's Q4_K super-block, the layout of candle's `BlockQ4K`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4K {
    /// f16 bits.
    d: u16,
    /// f16 bits.
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == std::mem::size_of::<CandleQ4K>());

/// A Q4_K weight matrix (n rows of k values, k % 256 == 0) on the CPU, read in place.
pub type Q4KMatrix = InPlaceMatrix<BlockQ4K>;

impl Q4KMatrix {
    /// `Some(..)` when `t` is a 2-D Q4_K tensor on the CPU with rows of a multiple of 256;
    /// `None` otherwise. Takes the tensor itself (no copy of the weights).
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        Self::new(t, GgmlDType::Q4K)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K / Q5_K super-block, unpacked to bytes
/// `[sc0..sc7, m0..m7]`.
#[inline]
pub(super) fn scales_and_mins(packed: &[u8; 12]) -> [u8; 16] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (a, b, c) = (w(0), w(4), w(8));
    // Sub-blocks 0..3 keep their scale and min in the low 6 bits of bytes 0..3 and 4..7;
    // sub-blocks 4..7 take 4 bits from bytes 8..11 and their top 2 from the top of bytes 0..7.
    let sc_lo = a & LOW6;
    let sc_hi = (c & LOW4) | (((a >> 6) & TOP2) << 4);
    let m_lo = b & LOW6;
    let m_hi = ((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4);
    let mut out = [0u8; 16];
    for (o, v) in out.chunks_exact_mut(4).zip([sc_lo, sc_hi, m_lo, m_hi]) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q4_k(lhs: &[f32], m: usize, w: &Q4KMatrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q4KMatrix {
    const NAME: &'static str = "Q4KMatrix";
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
        avx2::rows::<BlockQ4K, D>(ctx, rows)
    }

    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        // SAFETY: the mirror has candle's layout (asserted above).
        scalar_rows::<CandleQ4K>(ctx, rows)
    }
}

/// Portable kernel: candle's own dot product for the block type `C`, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers of `C` blocks and `rows` lie within `0..ctx.n`.
pub(super) unsafe fn scalar_rows<C: GgmlType<VecDotType = CandleQ8K>>(
    ctx: &Ctx,
    rows: std::ops::Range<usize>,
) {
    let (nb, m) = (ctx.nb, ctx.m);
    // SAFETY: `Q8KBlock` mirrors candle's `BlockQ8K` (asserted in `q8_k.rs`).
    let x = std::slice::from_raw_parts(ctx.qs as *const CandleQ8K, m * nb);
    let w = std::slice::from_raw_parts(ctx.w as *const C, ctx.n * nb);
    let out = ctx.out as *mut f32;
    for j in rows {
        let wrow = &w[j * nb..(j + 1) * nb];
        for i in 0..m {
            *out.add(i * ctx.n + j) = C::vec_dot(nb * QK_K, wrow, &x[i * nb..(i + 1) * nb]);
        }
    }
}

/// A K-quant super-block whose values are `d * sc * q - dmin * m` per 32-value sub-block with
/// 6-bit packed scales and mins (Q4_K, Q5_K): what the shared AVX2 tile needs from it.
#[cfg(target_arch = "x86_64")]
pub(super) trait ScaleMinBlock {
    /// `d`, `dmin` as f16 bits.
    fn d_dmin(&self) -> (u16, u16);
    fn packed_scales(&self) -> &[u8; 12];
    /// Sub-block `s`'s 32 unsigned quants (`s < 8`), in value order.
    ///
    /// # Safety
    /// AVX2 must be available.
    unsafe fn quants(&self, s: usize) -> std::arch::x86_64::__m256i;
}

#[cfg(target_arch = "x86_64")]
impl ScaleMinBlock for BlockQ4K {
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
        // Group s / 2's 32 bytes: sub-block 2g in the low nibbles, 2g + 1 in the high ones.
        let bits = _mm256_loadu_si256(self.qs.as_ptr().add(32 * (s / 2)) as *const __m256i);
        let bits = if s.is_multiple_of(2) {
            bits
        } else {
            _mm256_srli_epi16::<4>(bits)
        };
        _mm256_and_si256(bits, _mm256_set1_epi8(0x0f))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::cpu::avx2::{hsum, Dot, Lanes};
    use super::super::cpu::f16_to_f32;
    use super::{scales_and_mins, Ctx, Q8KBlock, ScaleMinBlock};
    use std::arch::x86_64::*;

    /// Lhs rows per tile when batching (each unpacked weight vector is reused for all of
    /// them). Tiles of 8 lhs rows x 1 weight row measured faster than 4 x 2, 6 x 1 and 4 x 1
    /// (`kernel_bench q4_k 32`: ~0.9x candle's repacked tiles against ~0.7x).
    const TALL: usize = 8;
    /// Lhs rows whose quants stay in cache while a work item's weight rows pass over them.
    const LHS_CHUNK: usize = 64;
    // The tail dispatch in `rows` covers up to TALL - 1 = 7 rows.
    const _: () = assert!(LHS_CHUNK.is_multiple_of(TALL) && TALL == 8);

    /// Weight rows `rows` against every lhs row, in tiles of lhs rows x weight rows.
    ///
    /// Every tile computes each of its outputs with the same float operations in the same
    /// order (see the module docs); only the integer sums inside a super-block are
    /// interleaved differently, and those are exact. So an output does not depend on the tile
    /// that computed it, nor on the batch.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `ctx` must describe live buffers of `B` blocks
    /// and `rows` lie within `0..ctx.n`.
    #[inline(always)]
    pub(in super::super) unsafe fn rows<B: ScaleMinBlock, D: Dot>(
        ctx: &Ctx,
        rows: std::ops::Range<usize>,
    ) {
        if ctx.m == 1 {
            // One weight row at a time: 1 x 2 and 1 x 4 tiles measured 1.7x slower here
            // (`kernel_bench q4_k 1`: the unpacked scales of several rows spill).
            for j in rows {
                tile::<B, D, 1>(ctx, 0, j);
            }
            return;
        }
        for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
            let i1 = ctx.m.min(i0 + LHS_CHUNK);
            for j in rows.clone() {
                let mut i = i0;
                while i + TALL <= i1 {
                    tile::<B, D, TALL>(ctx, i, j);
                    i += TALL;
                }
                match i1 - i {
                    0 => {}
                    1 => tile::<B, D, 1>(ctx, i, j),
                    2 => tile::<B, D, 2>(ctx, i, j),
                    3 => tile::<B, D, 3>(ctx, i, j),
                    4 => tile::<B, D, 4>(ctx, i, j),
                    5 => tile::<B, D, 5>(ctx, i, j),
                    6 => tile::<B, D, 6>(ctx, i, j),
                    _ => tile::<B, D, 7>(ctx, i, j),
                }
            }
        }
    }

    /// Lhs rows `i..i + R` (`R <= 8`) against weight row `j`.
    ///
    /// Per output, per super-block: `acc = fma(d_w * d_x, f32(sumi), acc)` (8 lanes), and the
    /// min term `acc_m = fma(-dmin_w * d_x, f32(summ), acc_m)` in the output's own lane of an
    /// 8-lane vector (lane r for lhs row i + r), `summ` the exact integer `Σ_s m[s] Σ x_s`.
    /// The output is `hsum(acc) + acc_m`. Lanes past `R` compute on neighbouring rows or the
    /// scratch's padding and are dropped.
    #[inline(always)]
    unsafe fn tile<B: ScaleMinBlock, D: Dot, const R: usize>(ctx: &Ctx, i: usize, j: usize) {
        let (nb, m) = (ctx.nb, ctx.m);
        let x = ctx.qs as *const Q8KBlock;
        let dx = ctx.d8 as *const f32;
        let sums = ctx.sums as *const i16;
        let wrow = (ctx.w as *const B).add(j * nb);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = _mm256_setzero_ps();
        // R = 1 (decoding): the same min-term chain as lane 0 of `acc_m`, as a scalar.
        let mut acc_m1 = 0f32;
        for b in 0..nb {
            let blk = &*wrow.add(b);
            let (d, dmin) = blk.d_dmin();
            let (dw, dminw) = (f16_to_f32(d), f16_to_f32(dmin));
            let sm = scales_and_mins(blk.packed_scales());
            // The 8 scales as i16, in both 128-bit lanes.
            let sc128 = _mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr() as *const __m128i));
            let scales = _mm256_set_m128i(sc128, sc128);
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                // Sub-block s's scale in every i16 lane.
                let pick = _mm256_set1_epi16(((2 * s) | ((2 * s + 1) << 8)) as i16);
                let sc = _mm256_shuffle_epi8(scales, pick);
                let q = blk.quants(s);
                for (r, sumi) in sumi.iter_mut().enumerate() {
                    let xb = &*x.add((i + r) * nb + b);
                    let xv = _mm256_loadu_si256(xb.qs.as_ptr().add(32 * s) as *const __m256i);
                    *sumi = D::dot4_scaled(*sumi, q, xv, sc);
                }
            }
            let dxb = dx.add(b * m + i);
            for (r, (acc, sumi)) in acc.iter_mut().zip(sumi).enumerate() {
                *acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(dw * *dxb.add(r)),
                    _mm256_cvtepi32_ps(sumi),
                    *acc,
                );
            }
            if R == 1 {
                // The block's bsums give the 8 sub-block sums; times the mins, 4 exact i32
                // lanes, summed exactly.
                let xb = &*x.add(i * nb + b);
                let bsums = _mm256_loadu_si256(xb.bsums.as_ptr() as *const __m256i);
                let sums32 = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                );
                let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(sm.as_ptr().add(8) as *const __m128i));
                let p = _mm_madd_epi16(mins, sums32);
                let p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
                let p = _mm_add_epi32(p, _mm_shuffle_epi32::<1>(p));
                let summ = _mm_cvtsi128_si32(p) as f32;
                acc_m1 = (-dminw * *dxb).mul_add(summ, acc_m1);
                continue;
            }
            // The min terms of 8 rows at once: per pair of sub-blocks, one madd of the rows'
            // (Σ x_2p, Σ x_2p+1) against (m[2p], m[2p + 1]).
            let mut summ = _mm256_setzero_si256();
            for p in 0..4 {
                let pair = sm[8 + 2 * p] as i32 | (sm[8 + 2 * p + 1] as i32) << 16;
                let rows =
                    _mm256_loadu_si256(sums.add(((b * 4 + p) * m + i) * 2) as *const __m256i);
                summ = _mm256_add_epi32(summ, _mm256_madd_epi16(rows, _mm256_set1_epi32(pair)));
            }
            let scale_m = _mm256_mul_ps(_mm256_set1_ps(-dminw), _mm256_loadu_ps(dxb));
            acc_m = _mm256_fmadd_ps(scale_m, _mm256_cvtepi32_ps(summ), acc_m);
        }
        let mut mins = Lanes([0.0; 8]);
        _mm256_store_ps(mins.0.as_mut_ptr(), acc_m);
        if R == 1 {
            mins.0[0] = acc_m1;
        }
        let out = ctx.out as *mut f32;
        for (r, a) in acc.into_iter().enumerate() {
            *out.add((i + r) * ctx.n + j) = hsum(a) + mins.0[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_k_quant_kernel;
    use super::*;

    #[test]
    fn scales_and_mins_unpack_as_ggml_documents() {
        // get_scale_min_k4, written out per sub-block.
        let mut seed = 7u32;
        for _ in 0..1000 {
            let mut q = [0u8; 12];
            for b in q.iter_mut() {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (seed >> 24) as u8;
            }
            let got = scales_and_mins(&q);
            for j in 0..8 {
                let (sc, m) = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    (
                        (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
                        (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                    )
                };
                assert_eq!((got[j], got[8 + j]), (sc, m), "{q:?} sub-block {j}");
            }
        }
    }

    #[test]
    fn matches_candle_in_place_and_row_invariant() {
        check_k_quant_kernel::<CandleQ4K, _>(
            GgmlDType::Q4K,
            |t| Q4KMatrix::from_qtensor(t).unwrap(),
            |w| w.addr,
        );
    }
}
