//! Q4_1 weights x Q8_1 activations on the CPU, replacing candle's scalar Q4_1 x Q8_1 path.
//!
//! # Why
//!
//! candle-core 0.11.1 has SIMD dot products for most GGML block types but not for Q4_1: its
//! `<BlockQ4_1 as GgmlType>::vec_dot` falls through to `vec_dot_unopt`, a scalar nibble loop.
//! Our default model stores nearly every 2-D weight as Q4_1, so that loop was most of the
//! inference time. [`Q4_1Matrix`] holds such a weight and [`Q4_1Matrix::forward`] computes
//! `xs @ W^T` like `QMatMul::forward`, 4-9x faster (`examples/kernel_bench.rs`).
//!
//! # Layout
//!
//! * Weights: `n` rows of `k` values (`k % 32 == 0`), each row `k / 32` consecutive
//!   [`BlockQ4_1`]s, rows one after the other. The block is GGML's own 20-byte block
//!   (`d: f16, m: f16, qs: [u8; 16]`; value `j` is `d * (qs[j] & 0xF) + m`, value `j + 16` is
//!   `d * (qs[j] >> 4) + m`), so loading is a copy of the GGUF bytes and the matrix takes no more
//!   memory (or bandwidth per token) than the file.
//! * Activations: every row of `lhs` is quantized to Q8_1 exactly as candle does, into the
//!   layout `q8_1.rs` describes (quants row-major; scales `d8` and sums `s8` block-major, so the
//!   kernel that serves 8 lhs rows at once finds their 8 values side by side).
//!
//! # Numerics
//!
//! Per block the kernel computes what candle's `vec_dot_unopt` computes,
//! `d4 * d8 * Σ q4_i q8_i + m4 * s8`. The integer dot product is exact (`maddubs` of the u8
//! nibbles with the i8 quants, then `madd` with ones: 8 lanes of i32), as are `d4 * d8` and
//! `m4 * s8` (products of two f16 values fit in an f32). The 8 lanes are converted to f32 and
//! fused-multiply-added with the broadcast `d4 * d8` into an 8-lane accumulator; `m4 * s8` is
//! summed in a separate one; at the end of the row the 8 lanes are summed in a fixed order and
//! the `m` sum added. Only the rounding of the f32 sums differs from candle's (which rounds
//! `sumi * d4` and sums block by block), so results agree with it to float rounding; the tests
//! hold them to `1e-4 * max|ref|`.
//!
//! **Row invariance.** Output `(i, j)` is a function of lhs row `i` and weight row `j` alone: it
//! is computed by the same sequence of floating-point operations whatever `m` is, whichever
//! other rows share the call, whichever kernel and tile computes it and whichever thread runs
//! it. The kernels differ only in how many independent outputs they interleave and in which
//! vector lanes the (exact) scales and the `m` sums live. So a sequence's logits are bitwise the
//! same alone or in any batch, which the engine's batch-invariance tests rely on.
//!
//! # Kernels and threading
//!
//! The AVX2 path (`avx2`, `fma`, `f16c`, detected once at run time by [`super::cpu`]) has two kernels:
//!
//! * *wide*, for `m = 1` (decoding one sequence): one lhs row against 4 weight rows, so each
//!   activation block is loaded once for 4 weight blocks; it prefetches the weight rows ahead,
//!   which matters when they stream from DRAM (every weight is read once per step);
//! * *tall*, for `m > 1`: 8 lhs rows against one weight row, so each weight block is unpacked
//!   (nibbles to bytes, f16 scales to f32) once for 8 rows. Lhs rows are visited 64 at a time
//!   to stay in L2.
//!
//! aarch64 gets a NEON kernel (the portable formula per output, integer dots in NEON); other
//! CPUs a portable scalar loop with the same per-block formula.
//!
//! Work is split over weight rows (output columns), 4 rows per item, handed out by the kernels'
//! own pool (`cpu::pool`, which parks when idle). An item computes its
//! weight rows against *all* `m` lhs rows, so each weight row is read from memory once per call
//! however many tokens are batched: a step decoding 30 sequences reads the weights once, not 30
//! times. Every output element is written by exactly one item, through a raw pointer, as
//! candle's own matmul does. The lhs is quantized on the calling thread before the pool starts
//! (about 2% of the time).

use super::cpu::{self, f16_to_f32};
use super::q8_1::Q8Quants;
use super::{forward_cpu, matmul_with, CpuMatrix, Ctx, QK};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

/// GGML's Q4_1 block: 32 values as `d * q + m` with 4-bit `q`. `d` and `m` are IEEE half
/// floats, stored as their bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// Scale (f16 bits).
    pub d: u16,
    /// Minimum, i.e. the value of quant 0 (f16 bits).
    pub m: u16,
    /// Low nibbles: values 0..16; high nibbles: values 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// Q4_1 weights (n rows of k values, k % 32 == 0) laid out for the SIMD kernel.
#[derive(Clone)]
pub struct Q4_1Matrix {
    n: usize,
    k: usize,
    /// `n * k / 32` blocks, row-major.
    blocks: Vec<BlockQ4_1>,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4_1Matrix({} x {})", self.n, self.k)
    }
}

impl Q4_1Matrix {
    /// `Some(..)` when `t` is a 2-D Q4_1 [`QTensor`] on the CPU (its bytes are copied); `None`
    /// for any other dtype, rank or device.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q4_1 || !t.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = match t.shape().dims() {
            &[n, k] => (n, k),
            _ => return Ok(None),
        };
        if !k.is_multiple_of(QK) {
            return Ok(None);
        }
        let data = t.data()?;
        let n_blocks = n * (k / QK);
        let size = std::mem::size_of::<BlockQ4_1>();
        if data.len() != n_blocks * size {
            candle_core::bail!(
                "Q4_1 tensor {:?}: {} bytes, expected {}",
                t.shape(),
                data.len(),
                n_blocks * size
            );
        }
        let blocks = data
            .chunks_exact(size)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..]);
                BlockQ4_1 {
                    d: u16::from_le_bytes([b[0], b[1]]),
                    m: u16::from_le_bytes([b[2], b[3]]),
                    qs,
                }
            })
            .collect();
        Ok(Some(Self { n, k, blocks }))
    }

    /// Number of weight rows `n` (output features).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Number of columns `k` (input features).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights. Non-f32 inputs are computed in f32 and the result
    /// cast back; non-contiguous inputs are made contiguous first.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`, `lhs` being `m * k` f32,
/// row-major, and `out` at least `m * n` long.
pub fn matmul_q4_1(lhs: &[f32], m: usize, w: &Q4_1Matrix, out: &mut [f32]) {
    matmul_with(cpu::isa(), lhs, m, w, out)
}

impl CpuMatrix for Q4_1Matrix {
    const NAME: &'static str = "Q4_1Matrix";

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn blocks_addr(&self) -> usize {
        self.blocks.as_ptr() as usize
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

/// Portable kernel: same per-block formula, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers and `rows` lie within `0..ctx.n`.
unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
    let (nb, m) = (ctx.nb, ctx.m);
    let qs = std::slice::from_raw_parts(ctx.qs as *const Q8Quants, m * nb);
    let d8 = std::slice::from_raw_parts(ctx.d8 as *const f32, m * nb);
    let s8 = std::slice::from_raw_parts(ctx.s8 as *const f32, m * nb);
    let w = std::slice::from_raw_parts(ctx.w as *const BlockQ4_1, ctx.n * nb);
    let out = ctx.out as *mut f32;
    for j in rows {
        let wrow = &w[j * nb..(j + 1) * nb];
        for i in 0..m {
            let q8 = &qs[i * nb..(i + 1) * nb];
            let mut sum = 0f32;
            let mut sum_m = 0f32;
            for (b, (wb, q)) in wrow.iter().zip(q8).enumerate() {
                let mut sumi = 0i32;
                for t in 0..QK / 2 {
                    sumi += (wb.qs[t] & 0xf) as i32 * q.0[t] as i32
                        + (wb.qs[t] >> 4) as i32 * q.0[t + QK / 2] as i32;
                }
                sum += sumi as f32 * (f16_to_f32(wb.d) * d8[b * m + i]);
                sum_m += f16_to_f32(wb.m) * s8[b * m + i];
            }
            *out.add(i * ctx.n + j) = sum + sum_m;
        }
    }
}

/// The AVX2 kernels.
///
/// Every output `(i, j)` is computed with this sequence, whichever kernel computes it:
/// for each block `b`, `p` = the 8 i32 lanes of `madd(maddubs(q4, q8), 1)` converted to f32,
/// `acc = fma(p, broadcast(d4 * d8), acc)` and `acc_m = fma(m4, s8, acc_m)` (one lane); at the
/// end `hsum(acc) + acc_m` with a fixed `hsum`. The kernels differ only in how many outputs
/// they interleave and in which vector lanes `d4 * d8` and `acc_m` live.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::{bcast_mem, hsum, Dot, Lanes};
    use super::{BlockQ4_1, Ctx, Q8Quants};
    use std::arch::x86_64::*;

    /// How many blocks ahead (384 x 20 bytes, ~7.5 KiB: about 20 rows of a 576-wide matrix)
    /// both kernels prefetch their weight rows. Decode streams every weight from DRAM once
    /// per step, and SmolLM2's matrices are too small (576-wide rows, 0.1-1 MB each) for the
    /// hardware prefetcher to ramp up: `kernel_bench model=SmolLM2 1` (every Q4_1 weight once,
    /// in model order) took a median 4.9 ms at 48 blocks ahead, 3.6-3.7 ms from 256 to 768 (8
    /// alternating runs each, 2026-12-02); the tall kernel at m = 4 and 8 gained 10-20% too.
    const PREFETCH: usize = 384;

    /// Lhs rows per tile of the tall kernel.
    const TALL: usize = 8;
    /// Lhs rows whose quants stay in cache while a work item's weight rows pass over them.
    const LHS_CHUNK: usize = 64;
    const _: () = assert!(LHS_CHUNK.is_multiple_of(TALL));

    /// Weight rows per tile of the wide kernel.
    const WIDE: usize = 4;

    super::super::avx2_tile_driver!();

    /// The 32 weights of a block as u8 in 0..16, in value order: the low nibbles in bytes
    /// 0..16, the high ones in 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(blk: *const BlockQ4_1) -> __m256i {
        let x = _mm256_broadcastsi128_si256(_mm_loadu_si128((*blk).qs.as_ptr() as *const __m128i));
        // Shift the upper copy right by 4 (64-bit lanes; the mask drops what crosses bytes).
        let shifted = _mm256_srlv_epi64(x, _mm256_set_epi64x(4, 4, 0, 0));
        _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f))
    }

    /// Σ q4 * q8 of one block pair as 8 f32 lanes (each an exact integer).
    #[inline(always)]
    unsafe fn dot_lanes<D: Dot>(q4: __m256i, q8: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(D::dot4(_mm256_setzero_si256(), q4, q8))
    }

    /// Lhs row `i` against weight rows `j..j + C` (`C <= 4`).
    ///
    /// Per block the `C` weight blocks' `[d, m]` are widened together into
    /// `dm = [d0, m0, d1, m1, ..]`; `dm * d8` has weight row `c`'s scale in lane `2c`, and
    /// `acc_m = fma(dm, s8, acc_m)` keeps its `m` term in lane `2c + 1`.
    #[inline(always)]
    unsafe fn wide<D: Dot, const C: usize>(ctx: &Ctx, i: usize, j: usize) {
        let (nb, m) = (ctx.nb, ctx.m);
        let w = ctx.w as *const BlockQ4_1;
        let q8row = (ctx.qs as *const Q8Quants).add(i * nb);
        let d8 = (ctx.d8 as *const f32).add(i);
        let s8 = (ctx.s8 as *const f32).add(i);
        let wrow: [*const BlockQ4_1; C] = std::array::from_fn(|c| w.add((j + c) * nb));
        let mut acc = [_mm256_setzero_ps(); C];
        let mut acc_m = _mm256_setzero_ps();
        for b in 0..nb {
            let mut q4 = [_mm256_setzero_si256(); C];
            let mut dm_bits = _mm_setzero_si128();
            for c in 0..C {
                let blk = wrow[c].add(b);
                _mm_prefetch::<_MM_HINT_T0>(wrow[c].wrapping_add(b + PREFETCH) as *const i8);
                q4[c] = unpack(blk);
                let bits = std::ptr::read_unaligned(blk as *const i32);
                dm_bits = match c {
                    0 => _mm_cvtsi32_si128(bits),
                    1 => _mm_insert_epi32::<1>(dm_bits, bits),
                    2 => _mm_insert_epi32::<2>(dm_bits, bits),
                    _ => _mm_insert_epi32::<3>(dm_bits, bits),
                };
            }
            let dm = _mm256_cvtph_ps(dm_bits);
            let scales = _mm256_mul_ps(dm, _mm256_broadcast_ss(&*d8.add(b * m)));
            acc_m = _mm256_fmadd_ps(dm, _mm256_broadcast_ss(&*s8.add(b * m)), acc_m);
            let y = _mm256_load_si256(q8row.add(b) as *const __m256i);
            // Broadcasting each scale back from memory costs a load instead of a shuffle per
            // weight row (measured ~6% faster than `vpermps`).
            let mut sc = Lanes([0f32; 8]);
            _mm256_store_ps(sc.0.as_mut_ptr(), scales);
            for c in 0..C {
                let scale = bcast_mem(&sc.0[2 * c]);
                acc[c] = _mm256_fmadd_ps(dot_lanes::<D>(q4[c], y), scale, acc[c]);
            }
        }
        let mut m_terms = [0f32; 8];
        _mm256_storeu_ps(m_terms.as_mut_ptr(), acc_m);
        let out = (ctx.out as *mut f32).add(i * ctx.n + j);
        for c in 0..C {
            *out.add(c) = hsum(acc[c]) + m_terms[2 * c + 1];
        }
    }

    /// Lhs rows `i..i + R` (`R <= 8`) against weight row `j`.
    ///
    /// Per block `d4` and `m4` are broadcast; row `r`'s scale is `d4 * d8[r]` and
    /// `acc_m = fma(m4, s8[i..i + 8], acc_m)` keeps row `r`'s `m` term in lane `r` (the block-major
    /// `s8` makes the `R` rows' values contiguous; lanes past `R` are ignored).
    #[inline(always)]
    unsafe fn tall<D: Dot, const R: usize>(ctx: &Ctx, i: usize, j: usize) {
        let (nb, m) = (ctx.nb, ctx.m);
        let wrow = (ctx.w as *const BlockQ4_1).add(j * nb);
        let q8 = ctx.qs as *const Q8Quants;
        let q8rows: [*const Q8Quants; R] = std::array::from_fn(|r| q8.add((i + r) * nb));
        let d8 = (ctx.d8 as *const f32).add(i);
        let s8 = (ctx.s8 as *const f32).add(i);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = wrow.add(b);
            _mm_prefetch::<_MM_HINT_T0>(wrow.wrapping_add(b + PREFETCH) as *const i8);
            let q4 = unpack(blk);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk as *const i32,
            )));
            let d4 = _mm256_broadcastss_ps(dm);
            let m4 = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
            acc_m = _mm256_fmadd_ps(m4, _mm256_loadu_ps(s8.add(b * m)), acc_m);
            for r in 0..R {
                let y = _mm256_load_si256(q8rows[r].add(b) as *const __m256i);
                // A broadcast load and a multiply: measured faster here than one shuffle of
                // a vector of 8 products, or a store and 8 broadcast loads.
                let scale = _mm256_mul_ps(d4, _mm256_broadcast_ss(&*d8.add(b * m + r)));
                acc[r] = _mm256_fmadd_ps(dot_lanes::<D>(q4, y), scale, acc[r]);
            }
        }
        let mut m_terms = [0f32; 8];
        _mm256_storeu_ps(m_terms.as_mut_ptr(), acc_m);
        let out = ctx.out as *mut f32;
        for r in 0..R {
            *out.add((i + r) * ctx.n + j) = hsum(acc[r]) + m_terms[r];
        }
    }
}

/// The NEON kernel: the portable kernel's formula for each output `(i, j)` (so its rows are
/// independent of the batch): per block the exact integer dot product (NEON's widening
/// multiplies), `acc = fma(sumi, d4 * d8, acc)` and `acc_m = fma(m4, s8, acc_m)`; at the end
/// `acc + acc_m`. Weight rows are prefetched as far ahead as the x86 kernels'.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::cpu::f16_to_f32;
    use super::super::cpu::neon::{dot16, prefetch};
    use super::{BlockQ4_1, Ctx, Q8Quants};
    use std::arch::aarch64::*;

    const PREFETCH: usize = 384;

    /// # Safety
    /// As `CpuMatrix::neon_rows`.
    #[inline(always)]
    pub(super) unsafe fn rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        let (nb, m) = (ctx.nb, ctx.m);
        let w = ctx.w as *const BlockQ4_1;
        let qs = ctx.qs as *const Q8Quants;
        let (d8, s8) = (ctx.d8 as *const f32, ctx.s8 as *const f32);
        let out = ctx.out as *mut f32;
        for j in rows {
            let wrow = w.add(j * nb);
            for i in 0..m {
                let x = qs.add(i * nb);
                let (mut acc, mut acc_m) = (0f32, 0f32);
                for b in 0..nb {
                    if i == 0 {
                        prefetch(wrow.wrapping_add(b + PREFETCH) as *const u8);
                    }
                    let blk = &*wrow.add(b);
                    let bits = vld1q_u8(blk.qs.as_ptr());
                    let lo = vreinterpretq_s8_u8(vandq_u8(bits, vdupq_n_u8(0x0f)));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(bits));
                    let q = (*x.add(b)).0.as_ptr();
                    let sum = dot16(
                        dot16(vdupq_n_s32(0), lo, vld1q_s8(q)),
                        hi,
                        vld1q_s8(q.add(16)),
                    );
                    let sumi = vaddvq_s32(sum);
                    acc = (sumi as f32).mul_add(f16_to_f32(blk.d) * *d8.add(b * m + i), acc);
                    acc_m = f16_to_f32(blk.m).mul_add(*s8.add(b * m + i), acc_m);
                }
                *out.add(i * ctx.n + j) = acc + acc_m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{assert_rows_batch_invariant, isas, lcg, max_abs_diff};
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{DType, Device, Module};

    fn weights(n: usize, k: usize, seed: u64) -> QTensor {
        let t = Tensor::from_vec(lcg(seed, n * k), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
    }

    const SHAPES: [(usize, usize); 4] = [(1536, 576), (576, 1536), (192, 576), (13, 64)];

    #[test]
    fn matches_candle_qmatmul() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let qt = weights(n, k, si as u64);
            let ours = Q4_1Matrix::from_qtensor(&qt).unwrap().unwrap();
            assert_eq!((ours.rows(), ours.cols()), (n, k));
            let reference = QMatMul::from_qtensor(qt).unwrap();
            for m in [1usize, 2, 3, 7, 30, 128] {
                let x = lcg(1000 + m as u64, m * k);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let tol = 1e-4 * max_ref + 1e-5;
                for isa in isas() {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, m, &ours, &mut got);
                    let max_diff = max_abs_diff(&got, &want);
                    assert!(
                        max_diff <= tol,
                        "(n={n}, k={k}, m={m}, scalar={}): max diff {max_diff} > {tol}",
                        isa == super::super::cpu::Isa::Scalar
                    );
                }
                let fwd: Vec<f32> = ours
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let max_diff = max_abs_diff(&fwd, &want);
                assert!(max_diff <= tol, "forward (n={n}, k={k}, m={m})");
            }
        }
    }

    #[test]
    fn rows_are_bitwise_independent_of_batch() {
        // Batch sizes hitting every kernel: m = 1 (wide), every tall tail 1..=7, whole tall
        // tiles, and the LHS_CHUNK boundary (64 + 6).
        let batches = [2usize, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 37, 70];
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let ours = Q4_1Matrix::from_qtensor(&weights(n, k, 50 + si as u64))
                .unwrap()
                .unwrap();
            assert_rows_batch_invariant(&ours, &lcg(77 + si as u64, 70 * k), &batches);
        }
    }

    #[test]
    fn other_dtypes_are_not_taken() {
        let t = Tensor::from_vec(lcg(5, 64 * 64), (64, 64), &Device::Cpu).unwrap();
        let q8 = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert!(Q4_1Matrix::from_qtensor(&q8).unwrap().is_none());
        let q4k = QTensor::quantize(
            &Tensor::zeros((4, 256), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        assert!(Q4_1Matrix::from_qtensor(&q4k).unwrap().is_none());
    }

    #[test]
    fn forward_handles_3d_input() {
        let (n, k) = (192, 576);
        let qt = weights(n, k, 9);
        let ours = Q4_1Matrix::from_qtensor(&qt).unwrap().unwrap();
        let reference = QMatMul::from_qtensor(qt).unwrap();
        let xt = Tensor::from_vec(lcg(10, 2 * 5 * k), (2, 5, k), &Device::Cpu).unwrap();
        let got = ours.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[2, 5, n]);
        let want = reference.forward(&xt).unwrap();
        let max_abs = |t: &Tensor| -> f32 {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let diff = max_abs(&(got - &want).unwrap());
        let max_ref = max_abs(&want);
        assert!(diff <= 1e-4 * max_ref + 1e-5, "diff {diff}");
        // Other float types are computed in f32 and cast back.
        let half = ours.forward(&xt.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!((half.dtype(), half.dims()), (DType::F16, &[2, 5, n][..]));
        // A mismatched k is an error, not a panic.
        let bad = Tensor::zeros((2, k + 32), DType::F32, &Device::Cpu).unwrap();
        assert!(ours.forward(&bad).is_err());
    }
}
