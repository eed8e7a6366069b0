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
    unsafe fn avx2_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        super::q4_k::avx2::rows::<BlockQ5K>(ctx, rows)
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
    use super::super::test_util::{assert_rows_batch_invariant, isas, lcg, max_abs_diff};
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ8K as CandleQ8K, GgmlType};
    use candle_core::{Device, Tensor};

    fn weights(n: usize, k: usize, seed: u64) -> Arc<QTensor> {
        let t = Tensor::from_vec(lcg(seed, n * k), (n, k), &Device::Cpu).unwrap();
        Arc::new(QTensor::quantize(&t, GgmlDType::Q5K).unwrap())
    }

    const SHAPES: [(usize, usize); 3] = [(1024, 256), (300, 1024), (7, 3584)];

    /// Candle's `BlockQ5K::vec_dot` over its own Q8_K activations, for every output.
    fn candle_vec_dots(qt: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = qt.shape().dims2().unwrap();
        let nb = k / QK_K;
        let data = qt.data().unwrap();
        // SAFETY: `data` is the storage of candle's blocks.
        let blocks: &[CandleQ5K] =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const CandleQ5K, n * nb) };
        let mut xq = vec![CandleQ8K::zeros(); nb];
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            CandleQ8K::from_float(&x[i * k..(i + 1) * k], &mut xq);
            for j in 0..n {
                out[i * n + j] = CandleQ5K::vec_dot(k, &blocks[j * nb..(j + 1) * nb], &xq);
            }
        }
        out
    }

    #[test]
    fn matches_candles_dot_products_without_copying_the_weights() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let qt = weights(n, k, 40 + si as u64);
            let ours = Q5KMatrix::from_qtensor(&qt).unwrap().unwrap();
            assert_eq!(
                ours.addr,
                qt.data().unwrap().as_ptr() as usize,
                "a copy was made"
            );
            for m in [1usize, 2, 5, 7, 9, 37] {
                let x = lcg(400 + m as u64, m * k);
                let want = candle_vec_dots(&qt, &x, m);
                let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let tol = 1e-4 * max_ref + 1e-5;
                // (`Isa::Scalar` is candle's own `vec_dot` per output: there this checks the
                // driver and the activation quantization, not a kernel of ours.)
                for isa in isas() {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(isa, &x, m, &ours, &mut got);
                    let diff = max_abs_diff(&got, &want);
                    assert!(diff <= tol, "({n}, {k}, m={m}, {isa:?}): {diff} > {tol}");
                }
            }
        }
    }

    #[test]
    fn rows_are_bitwise_independent_of_batch() {
        for (si, &(n, k)) in SHAPES.iter().enumerate() {
            let ours = Q5KMatrix::from_qtensor(&weights(n, k, 50 + si as u64))
                .unwrap()
                .unwrap();
            assert_rows_batch_invariant(
                &ours,
                &lcg(65 + si as u64, 72 * k),
                &[2, 3, 4, 5, 7, 9, 15, 70, 71],
            );
        }
    }

    #[test]
    fn other_dtypes_are_not_taken() {
        let t = Tensor::from_vec(lcg(5, 64 * 512), (64, 512), &Device::Cpu).unwrap();
        let q4 = Arc::new(QTensor::quantize(&t, GgmlDType::Q4K).unwrap());
        assert!(Q5KMatrix::from_qtensor(&q4).unwrap().is_none());
    }
}
