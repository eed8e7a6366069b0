//! Helpers the kernels' tests share: the ISAs to try, random quantized matrices, and checks
//! of a kernel against candle's reference and of row invariance.

use super::cpu::{isa, Isa};
use super::{matmul_with, CpuMatrix, QK_K};
use candle_core::quantized::QTensor;
use std::sync::Arc;

/// The scalar path and every SIMD one the CPU has.
pub fn isas() -> Vec<Isa> {
    let v = Isa::available();
    assert_eq!(v.last(), Some(&isa()), "the best path is the one chosen");
    v
}

/// Asserts that every output row of `w` is bitwise the same computed alone (m = 1) and in
/// batches of every size in `batches` (each at two offsets, so a row also sits at different
/// tile positions), on every ISA. `x` holds `max_m` random rows.
/// Also asserts that every SIMD path gives the same bits as the first (AVX2 and AVX2 with
/// VNNI's dot products compute the same integers and the same float operations).
pub fn assert_rows_batch_invariant<W: CpuMatrix>(w: &W, x: &[f32], batches: &[usize]) {
    let (n, k) = w.dims();
    let max_m = x.len() / k;
    let mut first_simd: Option<(Isa, Vec<Vec<f32>>)> = None;
    for isa in isas() {
        let solo: Vec<Vec<f32>> = (0..max_m)
            .map(|i| {
                let mut out = vec![0f32; n];
                matmul_with(isa, &x[i * k..(i + 1) * k], 1, w, &mut out);
                out
            })
            .collect();
        if isa != Isa::Scalar {
            match &first_simd {
                None => first_simd = Some((isa, solo.clone())),
                Some((first, want)) => {
                    let mut same = want.iter().flatten().zip(solo.iter().flatten());
                    assert!(
                        same.all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} and {first:?} give different bits for ({n}, {k})"
                    );
                }
            }
        }
        for &m in batches {
            for start in [0, 3] {
                if start + m > max_m {
                    continue;
                }
                let mut batch = vec![0f32; m * n];
                matmul_with(isa, &x[start * k..(start + m) * k], m, w, &mut batch);
                for i in 0..m {
                    let same = solo[start + i]
                        .iter()
                        .zip(&batch[i * n..(i + 1) * n])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{isa:?}: row {} of ({n}, {k}) differs alone and in a batch of {m}",
                        start + i
                    );
                }
            }
        }
    }
}

/// The tests every Q8_K-activation (K-quant) kernel shares, for the block type `C` whose
/// candle mirror is the reference and `ours` which builds our matrix from candle's tensor:
/// on three shapes, its outputs match candle's own `vec_dot` over candle's Q8_K activations
/// for every ISA and batch size (tails of every tile width included), the weights are read
/// in place (no copy), rows are bitwise independent of the batch, and other dtypes are not
/// taken.
pub fn check_k_quant_kernel<C, W>(
    dtype: candle_core::quantized::GgmlDType,
    ours: impl Fn(&Arc<QTensor>) -> Option<W>,
    addr: impl Fn(&W) -> usize,
) where
    C: candle_core::quantized::k_quants::GgmlType<
        VecDotType = candle_core::quantized::k_quants::BlockQ8K,
    >,
    W: CpuMatrix,
{
    use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
    use candle_core::quantized::GgmlDType;
    let quantize = |n, k, seed, dtype| Arc::new(quantized(n, k, seed, dtype));
    for (si, (n, k)) in [(1024, 256), (300, 1024), (7, 3584)]
        .into_iter()
        .enumerate()
    {
        let qt = quantize(n, k, 40 + si as u64, dtype);
        let w = ours(&qt).expect("our kernel takes the tensor");
        assert_eq!(
            addr(&w),
            qt.data().unwrap().as_ptr() as usize,
            "a copy was made"
        );
        let nb = k / QK_K;
        let data = qt.data().unwrap();
        // SAFETY: `data` is the storage of candle's blocks of type `C`.
        let blocks: &[C] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const C, n * nb) };
        for m in [1usize, 2, 5, 7, 9, 37] {
            let x = lcg(400 + m as u64, m * k);
            let mut xq = vec![BlockQ8K::zeros(); nb];
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                BlockQ8K::from_float(&x[i * k..(i + 1) * k], &mut xq);
                for j in 0..n {
                    want[i * n + j] = C::vec_dot(k, &blocks[j * nb..(j + 1) * nb], &xq);
                }
            }
            let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = 1e-4 * max_ref + 1e-5;
            // (`Isa::Scalar` is candle's own `vec_dot` per output: there this checks the
            // driver and the activation quantization, not a kernel of ours.)
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, m, &w, &mut got);
                let diff = max_abs_diff(&got, &want);
                assert!(diff <= tol, "({n}, {k}, m={m}, {isa:?}): {diff} > {tol}");
            }
        }
        assert_rows_batch_invariant(
            &w,
            &lcg(65 + si as u64, 72 * k),
            &[2, 3, 4, 5, 7, 9, 15, 70, 71],
        );
    }
    for other in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        if other != dtype {
            assert!(
                ours(&quantize(64, 512, 5, other)).is_none(),
                "{other:?} taken"
            );
        }
    }
}

/// The tests every in-place kernel over Q8_0 activations shares (Q8_0's, Q5_0's), for the
/// block type `C` whose candle mirror is the reference and `ours` which reads candle's tensor:
/// on `shapes`, its outputs match candle's own `vec_dot` over candle's Q8_0 activations for
/// every ISA and batch size, and candle's `QMatMul` through the tensor API (within 1%: it may
/// round activations otherwise); the weights are read in place (no copy); rows are bitwise
/// independent of the batch; a Q4_1 tensor is not taken.
pub fn check_q8_0_activation_kernel<C, W>(
    dtype: candle_core::quantized::GgmlDType,
    shapes: &[(usize, usize)],
    ours: impl Fn(&Arc<QTensor>) -> Option<W>,
    addr: impl Fn(&W) -> usize,
    forward: impl Fn(&W, &candle_core::Tensor) -> candle_core::Tensor,
) where
    C: candle_core::quantized::k_quants::GgmlType<
        VecDotType = candle_core::quantized::k_quants::BlockQ8_0,
    >,
    W: CpuMatrix,
{
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{Device, Module, Tensor};
    let to_vec = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    for (si, &(n, k)) in shapes.iter().enumerate() {
        let qt = Arc::new(quantized(n, k, si as u64, dtype));
        let w = ours(&qt).expect("our kernel takes the tensor");
        assert_eq!(w.dims(), (n, k));
        assert_eq!(
            addr(&w),
            qt.data().unwrap().as_ptr() as usize,
            "a copy was made"
        );
        let nb = k / super::QK;
        let data = qt.data().unwrap();
        // SAFETY: `data` is the storage of candle's blocks of type `C`.
        let blocks: &[C] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const C, n * nb) };
        let reference = QMatMul::from_arc(qt.clone()).unwrap();
        for m in [1usize, 2, 5, 8, 30] {
            let x = lcg(500 + m as u64, m * k);
            let mut xq = vec![BlockQ8_0::zeros(); nb];
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                BlockQ8_0::from_float(&x[i * k..(i + 1) * k], &mut xq);
                for j in 0..n {
                    want[i * n + j] = C::vec_dot(k, &blocks[j * nb..(j + 1) * nb], &xq);
                }
            }
            let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = 1e-4 * max_ref + 1e-5;
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, m, &w, &mut got);
                let diff = max_abs_diff(&got, &want);
                assert!(diff <= tol, "({n}, {k}, m={m}, {isa:?}): {diff} > {tol}");
            }
            let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
            let fwd = to_vec(forward(&w, &xt));
            let qmm = to_vec(reference.forward(&xt).unwrap());
            assert!(
                max_abs_diff(&fwd, &qmm) <= 1e-2 * max_ref,
                "forward ({n}, {k}, m={m})"
            );
        }
        let batches = [2usize, 3, 7, 8, 9, 17, 70];
        assert_rows_batch_invariant(&w, &lcg(90 + si as u64, 70 * k), &batches);
    }
    assert!(
        ours(&Arc::new(quantized(64, 64, 5, GgmlDType::Q4_1))).is_none(),
        "Q4_1 taken"
    );
}

/// The tests every tiled K-quant kernel shares, for the block type `C` whose candle mirror
/// is the reference and `ours` which repacks candle's tensor: on three shapes, against
/// candle's own `vec_dot` over candle's Q8_K activations, for every ISA and lhs-row count
/// (tails included), every ISA giving the same bits as the portable path; rows bitwise
/// independent of the batch; row counts that are not a multiple of 16 and other dtypes
/// not taken.
pub fn check_tiled_kernel<C, W>(
    dtype: candle_core::quantized::GgmlDType,
    ours: impl Fn(&QTensor) -> Option<W>,
) where
    C: candle_core::quantized::k_quants::GgmlType<
        VecDotType = candle_core::quantized::k_quants::BlockQ8K,
    >,
    W: CpuMatrix,
{
    use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
    use candle_core::quantized::GgmlDType;
    let quantize = quantized;
    for (si, (n, k)) in [(64, 256), (48, 1024), (16, 3584)].into_iter().enumerate() {
        let qt = quantize(n, k, 70 + si as u64, dtype);
        let w = ours(&qt).expect("tiled");
        let nb = k / QK_K;
        let data = qt.data().unwrap();
        // SAFETY: `data` is the storage of candle's blocks of type `C`.
        let blocks: &[C] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const C, n * nb) };
        for m in [1usize, 2, 3, 5, 9, 37, 70] {
            let x = lcg(500 + m as u64, m * k);
            let mut xq = vec![BlockQ8K::zeros(); nb];
            let mut want = vec![0f32; m * n];
            for i in 0..m {
                BlockQ8K::from_float(&x[i * k..(i + 1) * k], &mut xq);
                for j in 0..n {
                    want[i * n + j] = C::vec_dot(k, &blocks[j * nb..(j + 1) * nb], &xq);
                }
            }
            let max_ref = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = 1e-4 * max_ref + 1e-5;
            let mut first: Option<Vec<f32>> = None;
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, m, &w, &mut got);
                let diff = max_abs_diff(&got, &want);
                assert!(diff <= tol, "({n}, {k}, m={m}, {isa:?}): {diff} > {tol}");
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(
                        f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "({n}, {k}, m={m}): {isa:?} differs from the portable path"
                    ),
                }
            }
        }
        assert_rows_batch_invariant(&w, &lcg(80 + si as u64, 72 * k), &[2, 3, 4, 5, 7, 9, 70]);
    }
    assert!(
        ours(&quantize(24, 256, 1, dtype)).is_none(),
        "24 rows taken"
    );
    for other in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        if other != dtype {
            assert!(
                ours(&quantize(32, 256, 2, other)).is_none(),
                "{other:?} taken"
            );
        }
    }
}

/// An `(n, k)` matrix of [`lcg`] values quantized to `dtype` by candle.
pub fn quantized(
    n: usize,
    k: usize,
    seed: u64,
    dtype: candle_core::quantized::GgmlDType,
) -> QTensor {
    let t =
        candle_core::Tensor::from_vec(lcg(seed, n * k), (n, k), &candle_core::Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

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
