//! The seam models call: [`QLinear`] picks, once at load time, the kernel that serves a GGUF
//! tensor on its device (the table in the module docs); [`FusedLinear`] stacks neighbouring
//! matrices of one format into one matmul. [`Kernels`] forces candle's everywhere for the
//! parity tests.

use super::*;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};
use std::sync::Arc;

/// Which matmul kernels a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our own where we have one (Q4_1, Q5_0, Q8_0, Q4_K, Q5_K and Q6_K on the CPU), candle's elsewhere.
    #[default]
    Fastest,
    /// Candle's everywhere: the numerics of candle-transformers' `quantized_llama`, against
    /// which the forward pass is tested.
    CandleOnly,
}

/// A quantized weight matrix applied as `x @ W^T`, by whichever kernel serves its format on its
/// device.
pub enum QLinear {
    /// Q4_1 on the CPU: our SIMD kernel (candle 0.11 only has a scalar loop for it).
    Q4_1Cpu(Q4_1Matrix),
    /// Q8_0 on the CPU: our kernel, which reads each weight row once for the whole batch
    /// (candle's re-reads the matrix for every token of the step).
    Q8_0Cpu(Q8_0Matrix),
    /// Q5_0 on the CPU (the K-quant schemes' fallback for rows not a multiple of 256): our
    /// kernel, Q8_0's with the blocks unpacked in registers, read in place.
    Q5_0Cpu(Q5_0Matrix),
    /// Q4_K on the CPU, not shared, 16k rows: repacked into 16-row tiles that replace the
    /// file's blocks (the fast kernel for batches).
    Q4KTiledCpu(Q4KTiled),
    /// Q4_K on the CPU otherwise (tied embeddings): our kernel, row-invariant and reading the
    /// file's blocks in place (candle's keeps a repacked second copy of the weights).
    Q4KCpu(Q4KMatrix),
    /// Q5_K on the CPU: the Q4_K kernel's tiles with a fifth bit per quant.
    Q5KCpu(Q5KMatrix),
    /// Q6_K on the CPU, not shared, 16k rows: repacked into 16-row tiles that replace the
    /// file's blocks.
    Q6KTiledCpu(Q6KTiled),
    /// Q6_K on the CPU otherwise: our kernel, row-invariant (candle's switches kernel between one token
    /// and several, so a sequence's logits depend on the batch) and without candle's repacked
    /// second copy.
    Q6KCpu(Q6KMatrix),
    /// Candle's quantized matmul: every other format, and every device kernel.
    Candle(QMatMul),
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Q4_1Cpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q8_0Cpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q5_0Cpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q4KTiledCpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q4KCpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q5KCpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q6KTiledCpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Q6KCpu(m) => write!(f, "QLinear::{m:?}"),
            Self::Candle(_) => write!(f, "QLinear::Candle"),
        }
    }
}

impl QLinear {
    /// The fastest kernel for `t` allowed by `kernels`.
    pub fn new(t: QTensor, kernels: Kernels) -> Result<Self> {
        if kernels == Kernels::Fastest {
            if let Some(m) = Q4_1Matrix::from_qtensor(&t)? {
                return Ok(Self::Q4_1Cpu(m));
            }
            // Tiles only where they have SIMD kernels (x86-64). Elsewhere (aarch64) the
            // in-place kernels are faster: their portable path is candle's NEON dot product.
            if cfg!(target_arch = "x86_64") {
                if let Some(m) = Q4KTiled::from_qtensor(&t)? {
                    // `t` is dropped here: the tiles are the only copy.
                    return Ok(Self::Q4KTiledCpu(m));
                }
                if let Some(m) = Q6KTiled::from_qtensor(&t)? {
                    return Ok(Self::Q6KTiledCpu(m));
                }
            }
        }
        Self::shared(Arc::new(t), kernels)
    }

    /// The output head: applied only at the positions that sample (a few rows per step, one
    /// per sequence), so decoding speed is what counts. K-quants keep their in-place kernels
    /// there: the tiled ones spend more instructions unpacking per byte, which a single row
    /// does not amortize (Q6_K 128256 x 1024 at m = 1: 4.2-4.9 ms tiled against 2.9-3.5 ms in
    /// place).
    pub fn head(t: QTensor, kernels: Kernels) -> Result<Self> {
        if kernels == Kernels::Fastest {
            if let Some(m) = Q4_1Matrix::from_qtensor(&t)? {
                return Ok(Self::Q4_1Cpu(m));
            }
        }
        Self::shared(Arc::new(t), kernels)
    }

    /// A tensor that may also be used elsewhere (tied input/output embeddings, whose lookup is
    /// candle's). Only kernels that read the tensor in place serve it (Q8_0's and the
    /// K-quants'), so the weights are never held twice.
    pub fn shared(t: Arc<QTensor>, kernels: Kernels) -> Result<Self> {
        if kernels == Kernels::Fastest {
            if let Some(m) = Q8_0Matrix::from_qtensor(&t)? {
                return Ok(Self::Q8_0Cpu(m));
            }
            if let Some(m) = Q5_0Matrix::from_qtensor(&t)? {
                return Ok(Self::Q5_0Cpu(m));
            }
            if let Some(m) = Q4KMatrix::from_qtensor(&t)? {
                return Ok(Self::Q4KCpu(m));
            }
            if let Some(m) = Q5KMatrix::from_qtensor(&t)? {
                return Ok(Self::Q5KCpu(m));
            }
            if let Some(m) = Q6KMatrix::from_qtensor(&t)? {
                return Ok(Self::Q6KCpu(m));
            }
        }
        Ok(Self::Candle(QMatMul::from_arc(t)?))
    }

    /// `xs @ W^T` for `xs` of shape `(..., k)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q4_1Cpu(m) => m.forward(xs),
            Self::Q8_0Cpu(m) => m.forward(xs),
            Self::Q5_0Cpu(m) => m.forward(xs),
            Self::Q4KTiledCpu(m) => m.forward(xs),
            Self::Q4KCpu(m) => m.forward(xs),
            Self::Q5KCpu(m) => m.forward(xs),
            Self::Q6KTiledCpu(m) => m.forward(xs),
            Self::Q6KCpu(m) => m.forward(xs),
            Self::Candle(m) => m.forward(xs),
        }
    }
}

/// Weight matrices applied to the same input (a layer's q, k and v; its gate and up), as few
/// matrices as the formats allow: each run of neighbours that share a format and a width has
/// its rows stacked into one matrix, so a step reads the input once per run and runs one
/// matmul per run (one kernel launch on a GPU, one thread-pool dispatch on the CPU) instead of
/// one per matrix. In llama-quantize's `Q4_K_M` half the layers have a Q6_K `attn_v` beside
/// Q4_K `attn_q` and `attn_k`: there q and k run as one, v alone.
pub struct FusedLinear {
    runs: Vec<Run>,
}

/// One matrix of [`FusedLinear`]: the output columns of each part it holds, in order.
struct Run {
    linear: QLinear,
    rows: Vec<usize>,
}

impl FusedLinear {
    /// Stacks each run of neighbours in `ts` that share a format and a width (read on the CPU:
    /// the stacked bytes go to `device` once); a matrix alone goes to `device` as it is.
    pub fn new(ts: Vec<QTensor>, device: &candle_core::Device, kernels: Kernels) -> Result<Self> {
        let stackable = |a: &QTensor, b: &QTensor| {
            a.dtype() == b.dtype()
                && a.shape().dims().len() == 2
                && a.shape().dims()[1..] == b.shape().dims()[1..]
        };
        let mut groups: Vec<Vec<QTensor>> = Vec::new();
        for t in ts {
            match groups.last_mut() {
                Some(g) if stackable(&g[0], &t) => g.push(t),
                _ => groups.push(vec![t]),
            }
        }
        let runs = groups
            .into_iter()
            .map(|g| Self::stack(g, device, kernels))
            .collect::<Result<_>>()?;
        Ok(Self { runs })
    }

    /// One run: its matrices' rows in one matrix on `device` (one matrix: as it is).
    fn stack(ts: Vec<QTensor>, device: &candle_core::Device, kernels: Kernels) -> Result<Run> {
        let rows: Vec<usize> = ts.iter().map(|t| t.shape().dims()[0]).collect();
        if ts.len() == 1 {
            let t = ts.into_iter().next().expect("one matrix");
            return Ok(Run {
                linear: QLinear::new(to_device(t, device)?, kernels)?,
                rows,
            });
        }
        let dtype = ts[0].dtype();
        let k = ts[0].shape().dims()[1];
        let mut bytes = Vec::new();
        for t in &ts {
            bytes.extend_from_slice(&t.data()?);
        }
        drop(ts);
        let n: usize = rows.iter().sum();
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            device,
            dtype,
        )?;
        Ok(Run {
            linear: QLinear::new(QTensor::new(storage, (n, k))?, kernels)?,
            rows,
        })
    }

    /// How many matmuls one forward runs (1: every matrix stacked into one).
    pub fn matmuls(&self) -> usize {
        self.runs.len()
    }

    /// `xs @ W_i^T` for each matrix, in the order given to [`FusedLinear::new`], each
    /// contiguous: a copy of each part's columns (row by row) costs far less than the
    /// element-wise ops that follow would lose on strided views.
    pub fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        let mut out = Vec::new();
        for Run { linear, rows } in &self.runs {
            let y = linear.forward(xs)?;
            if rows.len() == 1 {
                out.push(y);
                continue;
            }
            let last = y.rank() - 1;
            let mut at = 0;
            for &n in rows {
                out.push(y.narrow(last, at, n)?.contiguous()?);
                at += n;
            }
        }
        Ok(out)
    }
}

/// `t` on `device` (a copy of its blocks when it is elsewhere).
fn to_device(t: QTensor, device: &candle_core::Device) -> Result<QTensor> {
    if t.device().same_device(device) {
        return Ok(t);
    }
    let shape = t.shape().clone();
    let storage = candle_core::quantized::QStorage::from_data(t.data()?, device, t.dtype())?;
    QTensor::new(storage, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{lcg, quantized};
    use candle_core::quantized::GgmlDType;

    /// Runs of neighbours that share a format are stacked (q and k in Q4_K beside a Q6_K v:
    /// two matmuls), and every part's output is what its matrix gives alone, bit for bit.
    #[test]
    fn fused_matrices_stack_by_runs_and_give_each_part_unchanged() {
        let k = 256;
        let cases: [(&[(usize, GgmlDType)], usize); 4] = [
            (
                &[
                    (64, GgmlDType::Q4K),
                    (32, GgmlDType::Q4K),
                    (32, GgmlDType::Q6K),
                ],
                2,
            ),
            (
                &[
                    (64, GgmlDType::Q4K),
                    (32, GgmlDType::Q4K),
                    (32, GgmlDType::Q4K),
                ],
                1,
            ),
            (
                &[
                    (64, GgmlDType::Q4K),
                    (32, GgmlDType::Q6K),
                    (32, GgmlDType::Q4K),
                ],
                3,
            ),
            (&[(48, GgmlDType::Q8_0), (48, GgmlDType::Q8_0)], 1),
        ];
        let xs = Tensor::from_vec(lcg(7, 3 * k), (3, k), &candle_core::Device::Cpu).unwrap();
        for (parts, matmuls) in cases {
            let tensors = || {
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, &(n, dtype))| quantized(n, k, i as u64, dtype))
            };
            let fused = FusedLinear::new(
                tensors().collect(),
                &candle_core::Device::Cpu,
                Kernels::Fastest,
            )
            .unwrap();
            assert_eq!(fused.matmuls(), matmuls, "{parts:?}");
            let got = fused.forward(&xs).unwrap();
            assert_eq!(got.len(), parts.len());
            for (i, (t, got)) in tensors().zip(got).enumerate() {
                let alone = QLinear::new(t, Kernels::Fastest)
                    .unwrap()
                    .forward(&xs)
                    .unwrap();
                assert_eq!(got.dims(), alone.dims(), "{parts:?} part {i}");
                assert_eq!(
                    got.to_vec2::<f32>().unwrap(),
                    alone.to_vec2::<f32>().unwrap(),
                    "{parts:?} part {i}"
                );
            }
        }
    }
}
