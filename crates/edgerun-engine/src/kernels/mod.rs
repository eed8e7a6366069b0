//! Kernels: how a quantized weight matrix is applied to a batch of activations.
//!
//! # The seam
//!
//! A model never names a kernel. It asks for a [`QLinear`] ("this GGUF tensor as a linear
//! layer") and calls [`QLinear::forward`] on a `(tokens, k)` activation matrix. [`QLinear::new`]
//! decides, once at load time, which implementation serves that tensor:
//!
//! | weight                  | device | kernel                                              |
//! |-------------------------|--------|-----------------------------------------------------|
//! | Q4_1, 2-D, `k % 32 == 0`  | CPU    | ours ([`q4_1`]: AVX2/VNNI, NEON, portable fallback)  |
//! | Q8_0, 2-D, `k % 32 == 0`  | CPU    | ours ([`q8_0`], read in place, tied or not; AVX2/VNNI, NEON) |
//! | Q4_K, `n % 16 == 0`, `k % 256 == 0`, [`QLinear::new`], x86-64 | CPU | ours ([`q4_k_tiled`], repacked into 16-row tiles that replace the blocks) |
//! | Q4_K, 2-D, `k % 256 == 0`, otherwise (tied, the head, aarch64) | CPU | ours ([`q4_k`], read in place) |
//! | Q5_K, 2-D, `k % 256 == 0` | CPU    | ours ([`q5_k`], Q4_K's in-place tiles)               |
//! | Q6_K, `n % 16 == 0`, `k % 256 == 0`, [`QLinear::new`], x86-64 | CPU | ours ([`q6_k_tiled`], repacked into 16-row tiles) |
//! | Q6_K, 2-D, `k % 256 == 0`, otherwise (tied, the head, aarch64) | CPU | ours ([`q6_k`], read in place) |
//! | anything else             | any    | candle's `QMatMul` (its CPU, CUDA and Metal kernels) |
//!
//! On aarch64 (`cpu::Isa::Neon`) Q4_1 and Q8_0 run NEON kernels of ours and the K-quants
//! their in-place kernels' portable path, which is candle's NEON `vec_dot` per output (the
//! tiles have no NEON kernel, so they are not made there). `scripts/test-aarch64.sh` runs the
//! kernels' tests for aarch64 under qemu-user.
//!
//! So on the CPU every matmul of a `Q4_K_M`, `Q5_K_M`, `Q6_K`, `Q8_0` or `Q4_1` file whose
//! matrices are all multiples of 256 wide (Llama-3-8B, Llama-3-mini) runs a row-invariant
//! kernel of ours. Where rows are not (SmolLM2's 576), llama-quantize falls back to Q5_0/Q5_1
//! for most matrices, and those still run candle's kernels, whose row invariance is not
//! promised.
//!
//! The tiles pay off where a matrix meets many rows per step (every prompt token); the output
//! head meets one row per sequence, so [`QLinear::head`] keeps it in place.
//!
//! [`Kernels::CandleOnly`] forces candle's everywhere (the reference the parity tests compare
//! against).
//!
//! # Layout of this module
//!
//! * [`cpu`]: instruction-set detection (once, at run time), the check that the CPU has what
//!   the build assumed, and the thread pool; every CPU kernel dispatches on `cpu::isa()` and
//!   nothing else.
//! * one file per **block format**: weights [`q4_1`], [`q8_0`] (with Q8_1 activations,
//!   `q8_1`) and [`q4_k`], [`q5_k`], [`q6_k`] (with Q8_K activations, `q8_k`); activations are
//!   quantized once per call. The thread-pool driver (`matmul_with`) and the tensor plumbing
//!   (`forward_cpu`) are shared by all; the `*_1` formats share a tiling
//!   (`avx2_tile_driver!`), Q4_K and Q5_K share theirs (`q4_k::avx2::rows`, over a
//!   `ScaleMinBlock`). A new format is a new file with its block type, a matrix type holding
//!   the GGUF bytes as they are, its `CpuMatrix` impl (activation format, kernels per ISA),
//!   and one arm in [`QLinear::new`].
//! * **device kernels** (CUDA, Metal) are candle's today, through `QMatMul`. One of our own goes
//!   in a file here too (`cuda_*.rs`, compiled only with its feature) and gets its own
//!   [`QLinear`] variant; nothing outside this module changes.
//!
//! # Contract every kernel keeps
//!
//! * `forward` computes `xs @ W^T` like candle's `QMatMul::forward`, to float rounding.
//! * **Row invariance**: output row `i` depends only on input row `i` and the weights, bit for
//!   bit, whatever else is in the batch. The engine's promise that a sequence generates the same
//!   tokens alone or in any batch rests on it.
//! * No second copy of the weights: a kernel keeps the file's blocks (or reorders them once)
//!   and drops candle's tensor.
//!
//! Candle 0.11 also picks its quantized CPU kernels at run time (Q4_K repacks into tiles, Q6_K
//! switches kernel between batch 1 and larger batches); formats served by candle inherit those
//! choices, row invariance included or not.

/// The AVX2 tiling the Q8_1- and Q8_0-activation kernels share: for `m = 1` (decoding one
/// sequence) `wide::<D, WIDE>` serves WIDE weight rows per activation block; for `m > 1`
/// `tall::<D, TALL>` serves TALL lhs rows per unpacked weight block, lhs rows taken LHS_CHUNK
/// at a time so they stay in L2. Expands to `rows::<D>(ctx, rows)` in a module that defines
/// `wide`, `tall` (both `#[inline(always)]`, generic over the [`cpu::avx2::Dot`] `D`), `WIDE`,
/// `TALL` and `LHS_CHUNK`.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_tile_driver {
    () => {
        /// Computes weight rows `rows` against every lhs row, with `D`'s dot products.
        ///
        /// # Safety
        /// Only called inside `CpuMatrix::rows`' entry point for `D` (AVX2, FMA and F16C, plus
        /// what `D` needs); `ctx` must describe live buffers and `rows` lie within `0..ctx.n`.
        #[inline(always)]
        pub(super) unsafe fn rows<D: Dot>(ctx: &Ctx, rows: std::ops::Range<usize>) {
            // The tail dispatch below covers tiles of up to 8 rows.
            const _: () = assert!(TALL <= 8 && TALL >= 1);
            if ctx.m == 1 {
                let mut j = rows.start;
                while j + WIDE <= rows.end {
                    wide::<D, WIDE>(ctx, 0, j);
                    j += WIDE;
                }
                for j in j..rows.end {
                    wide::<D, 1>(ctx, 0, j);
                }
            } else {
                for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
                    let i1 = ctx.m.min(i0 + LHS_CHUNK);
                    for j in rows.clone() {
                        let mut i = i0;
                        while i + TALL <= i1 {
                            tall::<D, TALL>(ctx, i, j);
                            i += TALL;
                        }
                        match i1 - i {
                            0 => {}
                            1 => tall::<D, 1>(ctx, i, j),
                            2 => tall::<D, 2>(ctx, i, j),
                            3 => tall::<D, 3>(ctx, i, j),
                            4 => tall::<D, 4>(ctx, i, j),
                            5 => tall::<D, 5>(ctx, i, j),
                            6 => tall::<D, 6>(ctx, i, j),
                            _ => tall::<D, 7>(ctx, i, j),
                        }
                    }
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2_tile_driver;

pub mod cpu;
pub mod q4_1;
pub mod q4_k;
pub mod q4_k_tiled;
pub mod q5_k;
pub mod q6_k;
pub mod q6_k_tiled;
pub mod q8_0;
mod q8_1;
mod q8_k;

pub use q4_1::{matmul_q4_1, BlockQ4_1, Q4_1Matrix};
pub use q4_k::Q4KMatrix;
pub use q4_k_tiled::Q4KTiled;
pub use q5_k::Q5KMatrix;
pub use q6_k::Q6KMatrix;
pub use q6_k_tiled::Q6KTiled;
pub use q8_0::{BlockQ8_0, Q8_0Matrix};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};
use cpu::Isa;
use std::sync::Arc;

/// Weight rows per work item handed to the thread pool (a multiple of every tile width), unless
/// a format says otherwise ([`CpuMatrix::GROUP`]).
const DEFAULT_GROUP: usize = 4;

/// Everything a worker needs, as plain addresses so the closure is `Sync`.
pub(crate) struct Ctx {
    nb: usize,
    n: usize,
    m: usize,
    /// The activation blocks, `m * nb`, row-major: `*const Q8Quants` (Q8_1) or
    /// `*const Q8KBlock` (Q8_K).
    qs: usize,
    /// `*const f32`, `m * nb` (+ pad), block-major: the activation blocks' scales.
    d8: usize,
    /// `*const f32`, `m * nb` (+ pad), block-major: Q8_1's `d * Σq` (unused for Q8_K).
    s8: usize,
    /// `*const i16`, Q8_K only: per block, per pair of 32-value sub-blocks, per row, the two
    /// sub-blocks' sums of quants (`q8_k.rs`), block-major; 0 for Q8_1.
    sums: usize,
    /// `*const` weight blocks of the format, `n * nb`.
    w: usize,
    /// `*mut f32`, `m * n`.
    out: usize,
}

/// A CPU weight matrix whose kernels take quantized activations (Q8_1 or Q8_K, per
/// [`CpuMatrix::ACTIVATIONS`]): what the shared driver ([`matmul_with`], [`forward_cpu`])
/// needs from a block format.
pub(crate) trait CpuMatrix: Sync {
    /// For error messages.
    const NAME: &'static str;
    /// The activation format its kernels read.
    const ACTIVATIONS: Activations = Activations::Q8_1;
    /// Weight rows per work item; work items start at multiples of it.
    const GROUP: usize = DEFAULT_GROUP;
    /// `(n, k)`: weight rows (output features) and columns (input features, a multiple of the
    /// block size: 32, or 256 for the K-quants).
    fn dims(&self) -> (usize, usize);
    /// Address of the first block; rows of `k / block size` blocks follow one another.
    fn blocks_addr(&self) -> usize;
    /// The AVX2 kernel with `D`'s integer dot products: weight rows `rows` against every lhs
    /// row, writing `out[i * n + j]`. `#[inline(always)]` and only called from the entry
    /// points below, so each `D` gets a copy compiled with its instructions.
    ///
    /// # Safety
    /// AVX2, FMA and F16C and what `D` needs must be available; `ctx` must describe live
    /// buffers of this matrix and `rows` lie within `0..n`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_rows<D: cpu::avx2::Dot>(ctx: &Ctx, rows: std::ops::Range<usize>);

    /// The kernel for [`Isa::Avx512`]: by default the 256-bit one with VNNI's dot products;
    /// a format with a 512-bit kernel overrides it (same bits, same contract).
    ///
    /// # Safety
    /// As [`CpuMatrix::simd_rows`], on a CPU with AVX-512 F, BW, VL and VNNI.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        Self::simd_rows::<cpu::avx2::Vnni>(ctx, rows)
    }

    /// The portable kernel, same contract.
    ///
    /// # Safety
    /// As [`CpuMatrix::simd_rows`], without the CPU requirement.
    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>);

    /// The kernel for [`Isa::Neon`]: by default the portable one (which for the K-quants in
    /// place is candle's NEON dot product); a format with a NEON kernel overrides it.
    ///
    /// # Safety
    /// As [`CpuMatrix::scalar_rows`], on a CPU with NEON.
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn neon_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        Self::scalar_rows(ctx, rows)
    }

    /// Dispatches to the kernel for `isa`.
    ///
    /// # Safety
    /// `isa` must be one the CPU has; otherwise as [`CpuMatrix::scalar_rows`].
    unsafe fn rows(isa: Isa, ctx: &Ctx, rows: std::ops::Range<usize>)
    where
        Self: Sized,
    {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2_entry::<Self>(ctx, rows),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Vnni => vnni_entry::<Self>(ctx, rows),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512_entry::<Self>(ctx, rows),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => neon_entry::<Self>(ctx, rows),
            Isa::Scalar => Self::scalar_rows(ctx, rows),
        }
    }
}

/// [`Isa::Neon`]'s entry point.
///
/// # Safety
/// As [`CpuMatrix::neon_rows`].
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon_entry<W: CpuMatrix>(ctx: &Ctx, rows: std::ops::Range<usize>) {
    W::neon_rows(ctx, rows)
}

/// [`Isa::Avx2`]'s entry point: every format's AVX2 kernel is compiled here.
///
/// # Safety
/// As [`CpuMatrix::simd_rows`], on a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_entry<W: CpuMatrix>(ctx: &Ctx, rows: std::ops::Range<usize>) {
    W::simd_rows::<cpu::avx2::Avx2>(ctx, rows)
}

/// [`Isa::Avx2Vnni`]'s entry point: the same kernels with VNNI's dot products.
///
/// # Safety
/// As [`CpuMatrix::simd_rows`], on a CPU that also has AVX-512 VNNI and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn vnni_entry<W: CpuMatrix>(ctx: &Ctx, rows: std::ops::Range<usize>) {
    W::simd_rows::<cpu::avx2::Vnni>(ctx, rows)
}

/// [`Isa::Avx512`]'s entry point.
///
/// # Safety
/// As [`CpuMatrix::simd_rows`], on a CPU with AVX-512 F, BW, VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn avx512_entry<W: CpuMatrix>(ctx: &Ctx, rows: std::ops::Range<usize>) {
    W::avx512_rows(ctx, rows)
}

/// `out[i * n + j] = dot(lhs row i, weight row j)` for `lhs` of `m * k` f32, row-major: the lhs
/// is quantized once on the calling thread, then weight rows are split over the thread pool,
/// `W::GROUP` per work item, each item computing its rows against all `m` lhs rows (so each
/// weight row is read from memory once per call however many tokens are batched).
pub(crate) fn matmul_with<W: CpuMatrix>(isa: Isa, lhs: &[f32], m: usize, w: &W, out: &mut [f32]) {
    let (n, k) = w.dims();
    // Real asserts: workers write `out` through a raw pointer.
    assert_eq!(lhs.len(), m * k, "lhs length for (m={m}, k={k})");
    assert!(
        out.len() >= m * n,
        "out too small: {} < {}",
        out.len(),
        m * n
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    let run = |ctx: Ctx| {
        cpu::parallel_chunks(n.div_ceil(W::GROUP), |groups| {
            let rows = groups.start * W::GROUP..n.min(groups.end * W::GROUP);
            // SAFETY: the pointers in `ctx` outlive the pool call; each output element
            // (i, j) is written only by the work item owning weight row j.
            unsafe { W::rows(isa, &ctx, rows) }
        });
    };
    let (w_addr, out_addr) = (w.blocks_addr(), out.as_mut_ptr() as usize);
    match W::ACTIVATIONS {
        Activations::Q8_1 => q8_1::with_quantized(isa, lhs, m, k, |scratch| {
            run(Ctx {
                nb: k / QK,
                n,
                m,
                qs: scratch.qs.as_ptr() as usize,
                d8: scratch.d8.as_ptr() as usize,
                s8: scratch.s8.as_ptr() as usize,
                sums: 0,
                w: w_addr,
                out: out_addr,
            })
        }),
        Activations::Q8K => q8_k::with_quantized(isa, lhs, m, k, |scratch| {
            run(Ctx {
                nb: k / QK_K,
                n,
                m,
                qs: scratch.blocks,
                d8: scratch.d,
                s8: 0,
                sums: scratch.sums,
                w: w_addr,
                out: out_addr,
            })
        }),
    }
}

/// `xs @ W^T` through [`matmul_with`]: `xs` of shape `(..., k)` on the CPU gives `(..., n)`.
/// Non-f32 inputs are computed in f32 and the result cast back; non-contiguous inputs are made
/// contiguous first.
pub(crate) fn forward_cpu<W: CpuMatrix>(w: &W, xs: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims();
    if !xs.device().is_cpu() {
        candle_core::bail!("{}::forward: input is not on the CPU", W::NAME);
    }
    let dims = xs.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!(
            "{}::forward: input {:?} incompatible with weight ({n}, {k})",
            W::NAME,
            xs.shape()
        );
    }
    let in_dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?.contiguous()?;
    let m = dims[..dims.len() - 1].iter().product::<usize>();
    let mut out = vec![0f32; m * n];
    {
        let (storage, layout) = xs.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("{}::forward: input is not on the CPU", W::NAME);
        };
        let start = layout.start_offset();
        let lhs = &cpu.as_slice::<f32>()?[start..start + m * k];
        matmul_with(cpu::isa(), lhs, m, w, &mut out);
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("dims end in k") = n;
    let out = Tensor::from_vec(out, out_dims, &Device::Cpu)?;
    if in_dtype == DType::F32 {
        Ok(out)
    } else {
        out.to_dtype(in_dtype)
    }
}

/// Values per quantization block (Q4_1 and Q8_1 alike).
pub const QK: usize = 32;

/// Values per K-quant super-block (Q6_K and Q8_K alike).
pub const QK_K: usize = 256;

/// How a weight format's kernels take their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activations {
    /// Q8_1 blocks of 32 (`q8_1.rs`): `Ctx::qs`, `Ctx::d8`, `Ctx::s8`.
    Q8_1,
    /// Q8_K blocks of 256 (`q8_k.rs`): `Ctx::qs` points at `[row][block]` blocks, `Ctx::d8`
    /// and `Ctx::sums` at their scales and sub-block sums, block-major.
    Q8K,
}

/// Which matmul kernels a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our own where we have one (Q4_1, Q8_0, Q4_K, Q5_K and Q6_K on the CPU), candle's elsewhere.
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

/// A weight matrix read in place from candle's CPU tensor of `B` blocks (rows of `k / block`
/// blocks, one after the other): no copy of the weights, and the tensor may stay shared with
/// others (tied embeddings). Each format's file gives it a `from_qtensor` and a `CpuMatrix`
/// impl ([`Q8_0Matrix`], [`Q6KMatrix`]).
pub struct InPlaceMatrix<B> {
    n: usize,
    k: usize,
    /// Keeps the blocks alive; never mutated.
    tensor: Arc<QTensor>,
    /// Address of the first block inside `tensor`'s storage.
    addr: usize,
    _block: std::marker::PhantomData<B>,
}

impl<B> Clone for InPlaceMatrix<B> {
    fn clone(&self) -> Self {
        Self {
            tensor: self.tensor.clone(),
            _block: std::marker::PhantomData,
            ..*self
        }
    }
}

impl<B> InPlaceMatrix<B> {
    /// `Some(..)` when `t` is a 2-D `dtype` tensor on the CPU whose rows are whole blocks;
    /// `None` for any other dtype, rank, device or row length.
    fn new(t: &Arc<QTensor>, dtype: candle_core::quantized::GgmlDType) -> Result<Option<Self>> {
        if t.dtype() != dtype || !t.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = match t.shape().dims() {
            &[n, k] => (n, k),
            _ => return Ok(None),
        };
        if !k.is_multiple_of(dtype.block_size()) {
            return Ok(None);
        }
        let data = t.data()?;
        let want = n * (k / dtype.block_size()) * std::mem::size_of::<B>();
        if data.len() != want {
            candle_core::bail!(
                "{dtype:?} tensor {:?}: {} bytes, expected {want}",
                t.shape(),
                data.len()
            );
        }
        // A CPU tensor's `data()` borrows its storage (candle's `Vec` of blocks), which lives and
        // stays put as long as the tensor, and candle 0.11.1 (pinned) never mutates it: the
        // address outlives the borrow.
        let std::borrow::Cow::Borrowed(bytes) = data else {
            return Ok(None);
        };
        let addr = bytes.as_ptr() as usize;
        if !addr.is_multiple_of(std::mem::align_of::<B>()) {
            return Ok(None);
        }
        Ok(Some(Self {
            n,
            k,
            tensor: t.clone(),
            addr,
            _block: std::marker::PhantomData,
        }))
    }

    /// Weight rows (output features).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// The tensor whose blocks it reads.
    pub fn tensor(&self) -> &Arc<QTensor> {
        &self.tensor
    }
}

impl<B> std::fmt::Debug for InPlaceMatrix<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let block = std::any::type_name::<B>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "InPlaceMatrix<{block}>({} x {})", self.n, self.k)
    }
}

/// Weight rows per tile of the tiled formats ([`q4_k_tiled`], [`q6_k_tiled`]).
pub const TILE_ROWS: usize = 16;

/// A weight matrix repacked once, at load, into tiles of [`TILE_ROWS`] rows x one 256-value
/// super-block (`tiles[t * nb + b]`: rows `16t..16t + 16`, super-block `b`) that replace the
/// file's blocks: what the tiled formats share (each gives it a tile type, a `pack` and a
/// `CpuMatrix` impl).
pub struct TiledMatrix<T> {
    n: usize,
    k: usize,
    tiles: Vec<T>,
}

impl<T> TiledMatrix<T> {
    /// `Some(..)` when `t` is a 2-D `dtype` tensor on the CPU with a multiple of 16 rows of a
    /// multiple of 256 values (GGML blocks `B` of 256 values): each tile is `pack` of its 16
    /// rows' blocks. `None` for anything else. The caller drops `t` afterwards: the tiles are
    /// the only copy of the weights.
    fn repack<B: Copy>(
        t: &QTensor,
        dtype: candle_core::quantized::GgmlDType,
        pack: impl Fn(&[B; TILE_ROWS]) -> T,
    ) -> Result<Option<Self>> {
        if t.dtype() != dtype || !t.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = match t.shape().dims() {
            &[n, k] => (n, k),
            _ => return Ok(None),
        };
        if !n.is_multiple_of(TILE_ROWS) || !k.is_multiple_of(QK_K) || k == 0 {
            return Ok(None);
        }
        let data = t.data()?;
        let nb = k / QK_K;
        let want = n * nb * std::mem::size_of::<B>();
        if data.len() != want {
            candle_core::bail!(
                "{dtype:?} tensor {:?}: {} bytes, expected {want}",
                t.shape(),
                data.len()
            );
        }
        let block = |row: usize, b: usize| -> B {
            let at = (row * nb + b) * std::mem::size_of::<B>();
            // SAFETY: `at` is in bounds (checked length); blocks are plain bytes.
            unsafe { std::ptr::read_unaligned(data.as_ptr().add(at) as *const B) }
        };
        let mut tiles = Vec::with_capacity(n / TILE_ROWS * nb);
        for t0 in (0..n).step_by(TILE_ROWS) {
            for b in 0..nb {
                tiles.push(pack(&std::array::from_fn(|r| block(t0 + r, b))));
            }
        }
        Ok(Some(Self { n, k, tiles }))
    }

    /// Weight rows (output features).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.k
    }
}

impl<T> std::fmt::Debug for TiledMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tile = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("?");
        write!(f, "TiledMatrix<{tile}>({} x {})", self.n, self.k)
    }
}

/// Helpers the kernels' tests share.
#[cfg(test)]
pub(crate) mod test_util {
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
            let blocks: &[C] =
                unsafe { std::slice::from_raw_parts(data.as_ptr() as *const C, n * nb) };
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
            let blocks: &[C] =
                unsafe { std::slice::from_raw_parts(data.as_ptr() as *const C, n * nb) };
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
        let t = candle_core::Tensor::from_vec(lcg(seed, n * k), (n, k), &candle_core::Device::Cpu)
            .unwrap();
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
}

#[cfg(test)]
mod tests {
    use super::test_util::{lcg, quantized};
    use super::*;
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
