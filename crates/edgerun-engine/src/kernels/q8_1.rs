//! Activations quantized to Q8_1 (32 values per block: `d`, `s = d * Σq`, `q: [i8; 32]`), the
//! left-hand side of the Q4_1 kernel (and of any `*_1` weight format).
//!
//! Every row is quantized exactly as candle's `BlockQ8_1::from_float` does: the scalar path
//! calls it, the AVX2 path reimplements it and is tested bit for bit against it, so the integers
//! and scales are those of candle's path. The quants go to a row-major array of 32-byte-aligned
//! blocks (one aligned load each); `d` and `s` are widened to f32 (exact) into two *block-major*
//! arrays (`[block][row]`), so a kernel that serves 8 lhs rows at once finds their 8 values side
//! by side. This lives in a thread-local scratch reused across calls.

use super::cpu::{f16_to_f32, Isa};
use super::QK;
use candle_core::quantized::k_quants::{BlockQ8_1 as CandleQ8_1, GgmlType};
use std::cell::RefCell;

/// Mirror of candle's `BlockQ8_1`, whose fields are crate-private: `d: f16, s: f16, qs: [i8; 32]`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Q8_1Mirror {
    d: u16,
    s: u16,
    qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<Q8_1Mirror>() == std::mem::size_of::<CandleQ8_1>());
const _: () = assert!(std::mem::align_of::<Q8_1Mirror>() == std::mem::align_of::<CandleQ8_1>());

/// The 32 quants of one activation block, aligned for one aligned 256-bit load.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Q8Quants(pub(crate) [i8; QK]);

/// Activations quantized to Q8_1: the quants row-major, the scales block-major.
#[derive(Default)]
pub(crate) struct LhsScratch {
    /// One row of candle's blocks, the output of `from_float`.
    pub(crate) candle: Vec<CandleQ8_1>,
    /// `qs[i * nb + b]`: block `b` of row `i`.
    pub(crate) qs: Vec<Q8Quants>,
    /// `d8[b * m + i]`: scale of block `b` of row `i` (f32), then at least [`SCALE_PAD`] more.
    pub(crate) d8: Vec<f32>,
    /// `s8[b * m + i]`: `d * Σq` of block `b` of row `i` (f32), then at least [`SCALE_PAD`] more.
    pub(crate) s8: Vec<f32>,
}

/// Slack after the block-major scales, so that a kernel may load 8 rows' worth from any row.
pub(crate) const SCALE_PAD: usize = 8;

thread_local! {
    static LHS_SCRATCH: RefCell<LhsScratch> = RefCell::new(LhsScratch::default());
}

/// Quantizes the `m` rows of `lhs` (`m * k` values, `k % 32 == 0`) into this thread's scratch
/// and hands it to `f`.
pub(crate) fn with_quantized<R>(
    isa: Isa,
    lhs: &[f32],
    m: usize,
    k: usize,
    f: impl FnOnce(&LhsScratch) -> R,
) -> R {
    LHS_SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        quantize_lhs(isa, lhs, m, k, &mut scratch);
        f(&scratch)
    })
}

/// Quantizes the `m` rows of `lhs` to Q8_1 exactly as candle's `BlockQ8_1::from_float` does and
/// lays the blocks out as [`LhsScratch`] describes: with an AVX2 reimplementation (bit-for-bit
/// the same for finite inputs, tested) or by calling `from_float` itself.
fn quantize_lhs(isa: Isa, lhs: &[f32], m: usize, k: usize, s: &mut LhsScratch) {
    let nb = k / QK;
    let total = m * nb;
    // Every element below `total` is overwritten; what lies past it (the pad) is only ever
    // loaded into lanes that are ignored, so stale values there are harmless.
    s.qs.resize(total, Q8Quants([0; QK]));
    s.d8.resize(total + SCALE_PAD, 0.0);
    s.s8.resize(total + SCALE_PAD, 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen when the CPU has AVX2, FMA and F16C; the slices
        // have the lengths `quantize` expects.
        Isa::Avx2 | Isa::Avx2Vnni | Isa::Avx512 => unsafe {
            avx2::quantize(lhs, m, k, &mut s.qs, &mut s.d8, &mut s.s8)
        },
        // The portable quantizer, for NEON too.
        _ => {
            if s.candle.len() < nb {
                s.candle.resize(nb, CandleQ8_1::zeros());
            }
            for (i, row) in lhs.chunks_exact(k).enumerate() {
                let blocks = &mut s.candle[..nb];
                CandleQ8_1::from_float(row, blocks);
                // SAFETY: `Q8_1Mirror` has the size, alignment and field order of candle's block.
                let mirror: &[Q8_1Mirror] =
                    unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const Q8_1Mirror, nb) };
                for (b, blk) in mirror.iter().enumerate() {
                    s.qs[i * nb + b] = Q8Quants(blk.qs);
                    s.d8[b * m + i] = f16_to_f32(blk.d);
                    s.s8[b * m + i] = f16_to_f32(blk.s);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::{hsum_epi32, pack_i8, round_to_i8};
    use super::{Q8Quants, QK};
    use std::arch::x86_64::*;

    /// Candle's `BlockQ8_1::from_float` for the `m` rows of `lhs` (`m * k` values), written
    /// into `qs` (`[row][block]`) and `d8` / `s8` (`[block][row]`, widened to f32). Per block:
    /// `amax = max |x|`, `d = amax / 127`, `id = 1 / d` (0 if `d == 0`),
    /// `q = round_half_away(x * id)`, `d16 = f16(d)`, `s16 = f16(f32(f16(Σq)) * f32(d16))`: the
    /// same IEEE operations in the same order, so the same bits for finite inputs. (NaN inputs
    /// give quants of 0 like candle's `as i8`, but may get another `amax`.)
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `lhs.len() == m * k`, `qs.len() >= m * k / 32`,
    /// `d8` and `s8` at least `m * k / 32` long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize(
        lhs: &[f32],
        m: usize,
        k: usize,
        qs: &mut [Q8Quants],
        d8: &mut [f32],
        s8: &mut [f32],
    ) {
        let nb = k / QK;
        assert!(
            lhs.len() == m * k && qs.len() >= m * nb && d8.len() >= m * nb && s8.len() >= m * nb
        );
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for i in 0..m {
            for b in 0..nb {
                let x = lhs.as_ptr().add(i * k + b * QK);
                let v: [__m256; 4] = std::array::from_fn(|t| _mm256_loadu_ps(x.add(8 * t)));
                let a: [__m256; 4] = std::array::from_fn(|t| _mm256_and_ps(v[t], abs_mask));
                let mx = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
                let mx = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
                let mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
                let amax = _mm_cvtss_f32(_mm_max_ss(mx, _mm_movehdup_ps(mx)));
                let d = amax / 127.0;
                let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
                let q: [__m256i; 4] = std::array::from_fn(|t| round_to_i8(_mm256_mul_ps(v[t], id)));
                let sum =
                    _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let sum = hsum_epi32(sum);
                _mm256_store_si256(qs.as_mut_ptr().add(i * nb + b) as *mut __m256i, pack_i8(q));
                let d16 = f16_round(d);
                let s16 = f16_round(f16_round(sum as f32) * d16);
                d8[b * m + i] = d16;
                s8[b * m + i] = s16;
            }
        }
    }

    /// `x` rounded to the nearest f16 (ties to even), as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_round(x: f32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(x),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::isa;
    use super::super::test_util::lcg;
    use super::*;

    #[test]
    fn lhs_quantization_is_candles_bit_for_bit() {
        let (m, k) = (9, 32 * 7);
        let mut x = lcg(123, m * k);
        // Row 1: large values; row 2: tiny (subnormal scale) with zeros; row 3: all zeros;
        // row 4: exact halves after scaling (amax = 127, so d = 1 and q = round(x)); row 5:
        // mixed signs with ties at every .5; the rest random with per-block scales.
        for (j, v) in x[k..2 * k].iter_mut().enumerate() {
            *v *= 1e30 * (j % 5) as f32;
        }
        for v in &mut x[2 * k..3 * k] {
            *v *= 1e-40; // 1 / d overflows: q = ±inf -> ±127 / -128, and 0 * inf = NaN -> 0
        }
        x[2 * k + 5] = 0.0;
        x[2 * k + 40] = -0.0;
        x[3 * k..4 * k].fill(0.0);
        for (j, v) in x[4 * k..5 * k].iter_mut().enumerate() {
            *v = if j % 32 == 0 {
                127.0
            } else {
                (j % 64) as f32 - 31.5
            };
        }
        for (j, v) in x[5 * k..6 * k].iter_mut().enumerate() {
            *v = if j % 32 == 7 {
                -127.0
            } else {
                ((j * 37) % 255) as f32 * 0.5 - 63.5
            };
        }
        for (j, v) in x[6 * k..].iter_mut().enumerate() {
            *v *= 10f32.powi((j / 32 % 9) as i32 - 4);
        }
        let mut ours = LhsScratch::default();
        quantize_lhs(isa(), &x, m, k, &mut ours);
        let mut reference = LhsScratch::default();
        quantize_lhs(Isa::Scalar, &x, m, k, &mut reference);
        let nb = k / QK;
        for i in 0..m {
            for b in 0..nb {
                let (o, r) = (i * nb + b, b * m + i);
                assert_eq!(ours.qs[o].0, reference.qs[o].0, "quants, row {i} block {b}");
                assert_eq!(
                    ours.d8[r].to_bits(),
                    reference.d8[r].to_bits(),
                    "d, row {i} block {b}"
                );
                assert_eq!(
                    ours.s8[r].to_bits(),
                    reference.s8[r].to_bits(),
                    "s, row {i} block {b}"
                );
            }
        }
    }
}
