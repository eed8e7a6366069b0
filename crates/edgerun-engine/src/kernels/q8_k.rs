//! Activations quantized to Q8_K (256 values per block: `d: f32`, `qs: [i8; 256]`,
//! `bsums: [i16; 16]`), the left-hand side of the K-quant weight formats (`q4_k.rs`, `q5_k.rs`, `q6_k.rs`).
//!
//! Every row is quantized exactly as candle's `BlockQ8K::from_float` does (`iscale = -127 / max`
//! for the first value of largest magnitude, `q = round(iscale * x)`, `d = 1 / iscale`): the
//! scalar path calls it, the AVX2 path reimplements it and is tested bit for bit against it, so
//! the integers and scales are those of candle's path. Blocks are row-major (`[row][block]`) in
//! a thread-local scratch reused across calls; scales and sub-block sums are also laid out
//! block-major for the batched tiles. (Vectorized because it runs on the calling thread while
//! the pool waits; even so it was 2.8% of the samples of a 522-token Llama-3-mini prefill.)

use super::cpu::Isa;
use super::QK_K;
use candle_core::quantized::k_quants::{BlockQ8K as CandleQ8K, GgmlType};
use std::cell::RefCell;

/// Mirror of candle's `BlockQ8K`, whose fields are crate-private.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8KBlock {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<Q8KBlock>() == std::mem::size_of::<CandleQ8K>());
const _: () = assert!(std::mem::align_of::<Q8KBlock>() == std::mem::align_of::<CandleQ8K>());

/// Padding of the block-major arrays: `ROW_PAD * nb` zero entries (times 8 for `sums`) at the
/// very end, so that a tile reading 8 rows from any row `i <= m - 2` of any block (or pair)
/// stays in bounds (reads past a block's `m` rows land in the next block's entries or the
/// padding; those lanes are dropped).
pub(crate) const ROW_PAD: usize = 8;

/// Where a call's quantized activations are (addresses, for `Ctx`).
pub(crate) struct Quantized {
    /// `[row][block]` blocks.
    pub(crate) blocks: usize,
    /// `d[b * m + i]`: block `b` of row `i`'s scale (f32), then the padding.
    pub(crate) d: usize,
    /// `sums[((b * 4 + p) * m + i) * 2 + t]`: the sum of the quants of 32-value sub-block
    /// `2p + t` of block `b` of row `i` (i16; at most 32 * 127 in magnitude), then the
    /// padding. Pairs of sub-blocks sit together so one `madd` against
    /// the weights' `(min[2p], min[2p + 1])` gives 8 rows' partial min terms at once.
    pub(crate) sums: usize,
}

#[derive(Default)]
struct Scratch {
    blocks: Vec<CandleQ8K>,
    d: Vec<f32>,
    sums: Vec<i16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Quantizes the `m` rows of `lhs` (`m * k` values, `k % 256 == 0`) into this thread's scratch
/// and hands `f` where the blocks, their scales and their sub-block sums are.
pub(crate) fn with_quantized<R>(
    isa: Isa,
    lhs: &[f32],
    m: usize,
    k: usize,
    f: impl FnOnce(Quantized) -> R,
) -> R {
    let nb = k / QK_K;
    SCRATCH.with(|cell| {
        let mut s = cell.borrow_mut();
        let s = &mut *s;
        if s.blocks.len() < m * nb {
            s.blocks.resize(m * nb, CandleQ8K::zeros());
        }
        let padded = (m + ROW_PAD) * nb;
        s.d.clear();
        s.d.resize(padded, 0.0);
        s.sums.clear();
        s.sums.resize(padded * 8, 0);
        for (i, (row, out)) in lhs
            .chunks_exact(k)
            .zip(s.blocks.chunks_exact_mut(nb))
            .enumerate()
        {
            quantize_row(isa, row, out);
            for (b, blk) in out.iter().enumerate() {
                // SAFETY: `Q8KBlock` mirrors candle's `BlockQ8K` (asserted above).
                let blk = unsafe { &*(blk as *const CandleQ8K as *const Q8KBlock) };
                s.d[b * m + i] = blk.d;
                for sub in 0..8 {
                    let (p, t) = (sub / 2, sub % 2);
                    s.sums[((b * 4 + p) * m + i) * 2 + t] =
                        blk.bsums[2 * sub] + blk.bsums[2 * sub + 1];
                }
            }
        }
        f(Quantized {
            blocks: s.blocks.as_ptr() as usize,
            d: s.d.as_ptr() as usize,
            sums: s.sums.as_ptr() as usize,
        })
    })
}

/// One row (`k % 256 == 0` values) into its blocks, as candle's `from_float`.
fn quantize_row(isa: Isa, row: &[f32], out: &mut [CandleQ8K]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512 => {
            for (x, blk) in row.chunks_exact(QK_K).zip(out.iter_mut()) {
                // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2, FMA and F16C;
                // `x` holds one block's values; `Q8KBlock` mirrors candle's block.
                let done = unsafe {
                    avx2::quantize_block(x, &mut *(blk as *mut CandleQ8K as *mut Q8KBlock))
                };
                if !done {
                    CandleQ8K::from_float(x, std::slice::from_mut(blk));
                }
            }
        }
        // The portable quantizer (candle's), for NEON too.
        _ => CandleQ8K::from_float(row, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::{hsum_epi32, pack_i8, round_to_i8};
    use super::{Q8KBlock, QK_K};
    use std::arch::x86_64::*;

    /// Candle's `BlockQ8K::from_float` for one block: `max` = the first value of largest
    /// magnitude, `iscale = -127 / max`, `q = clamp(round_half_away(iscale * x), -128, 127)`,
    /// `bsums` = sums of 16 quants, `d = 1 / iscale`; all zero when `max == 0`. The same IEEE
    /// operations in the same order, so the same bits. Returns `false`, writing nothing
    /// meaningful, for a block holding a NaN (whose `max` candle's strict comparisons pick
    /// differently): the caller then uses candle's code.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `x.len() == 256`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(x: &[f32], out: &mut Q8KBlock) -> bool {
        assert_eq!(x.len(), QK_K);
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let p = x.as_ptr();
        let mut mx = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        for t in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(p.add(8 * t));
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, abs_mask));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        if _mm256_movemask_ps(nan) != 0 {
            return false;
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 {
            out.d = 0.0;
            out.qs = [0; QK_K];
            out.bsums = [0; QK_K / 16];
            return true;
        }
        // The first value whose magnitude is `amax`, sign included.
        let target = _mm256_set1_ps(amax);
        let mut max = amax;
        for t in 0..QK_K / 8 {
            let v = _mm256_loadu_ps(p.add(8 * t));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                _mm256_and_ps(v, abs_mask),
                target,
            ));
            if hit != 0 {
                max = *p.add(8 * t + hit.trailing_zeros() as usize);
                break;
            }
        }
        let iscale = -127f32 / max;
        let is = _mm256_set1_ps(iscale);
        for g in 0..QK_K / 32 {
            let q: [__m256i; 4] = std::array::from_fn(|t| {
                round_to_i8(_mm256_mul_ps(is, _mm256_loadu_ps(p.add(32 * g + 8 * t))))
            });
            _mm256_storeu_si256(out.qs.as_mut_ptr().add(32 * g) as *mut __m256i, pack_i8(q));
            // The two 16-value sums.
            out.bsums[2 * g] = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
            out.bsums[2 * g + 1] = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
        }
        out.d = 1.0 / iscale;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::lcg;
    use super::*;

    /// Rows that exercise every branch: large and tiny magnitudes (1 / max overflowing), all
    /// zeros, exact halves after scaling, a largest magnitude present with both signs (the first
    /// one decides), NaN, and random values at many scales.
    #[test]
    fn quantization_is_candles_bit_for_bit() {
        let k = 2 * QK_K;
        let rows = 9;
        let mut x = lcg(321, rows * k);
        for (j, v) in x[k..2 * k].iter_mut().enumerate() {
            *v *= 1e30 * (j % 5) as f32;
        }
        for v in &mut x[2 * k..3 * k] {
            *v *= 1e-42;
        }
        x[2 * k + 5] = 0.0;
        x[2 * k + 40] = -0.0;
        x[3 * k..4 * k].fill(0.0);
        for (j, v) in x[4 * k..5 * k].iter_mut().enumerate() {
            *v = if j % 256 == 3 {
                -127.0
            } else {
                (j % 64) as f32 - 31.5
            };
        }
        for (j, v) in x[5 * k..6 * k].iter_mut().enumerate() {
            *v = ((j * 37) % 255) as f32 * 0.5 - 63.5;
        }
        // Both signs of the largest magnitude: -3 first in block 0, +3 first in block 1.
        x[6 * k + 10] = -3.0;
        x[6 * k + 200] = 3.0;
        x[6 * k + 256 + 7] = 3.0;
        x[6 * k + 256 + 9] = -3.0;
        x[7 * k + 77] = f32::NAN;
        for (j, v) in x[8 * k..].iter_mut().enumerate() {
            *v *= 10f32.powi((j / 32 % 9) as i32 - 4);
        }
        let nb = k / QK_K;
        for isa in super::super::test_util::isas() {
            for (i, row) in x.chunks_exact(k).enumerate() {
                let mut want = vec![CandleQ8K::zeros(); nb];
                CandleQ8K::from_float(row, &mut want);
                let mut got = vec![CandleQ8K::zeros(); nb];
                quantize_row(isa, row, &mut got);
                for b in 0..nb {
                    // SAFETY: `Q8KBlock` mirrors candle's block.
                    let (w, g) = unsafe {
                        (
                            &*(&want[b] as *const CandleQ8K as *const Q8KBlock),
                            &*(&got[b] as *const CandleQ8K as *const Q8KBlock),
                        )
                    };
                    assert_eq!(g.d.to_bits(), w.d.to_bits(), "{isa:?} row {i} block {b}: d");
                    assert_eq!(g.qs, w.qs, "{isa:?} row {i} block {b}: quants");
                    assert_eq!(g.bsums, w.bsums, "{isa:?} row {i} block {b}: sums");
                }
            }
        }
    }
}
