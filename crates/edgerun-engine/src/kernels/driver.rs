//! The shared CPU driver: activations quantized once per call, weight rows split over the
//! kernels' thread pool ([`matmul_with`]), the tensor plumbing around it ([`forward_cpu`]), and
//! [`CpuMatrix`], what a block format provides to it (its activation format and its kernels per
//! instruction set).

use super::cpu::{self, Isa};
use super::{q8_1, q8_k, QK, QK_K};
use candle_core::{DType, Device, Result, Storage, Tensor};

/// Weight rows per work item handed to the thread pool (a multiple of every tile width), unless
/// a format says otherwise ([`CpuMatrix::GROUP`]).
const DEFAULT_GROUP: usize = 4;

/// Everything a worker needs, as plain addresses so the closure is `Sync`.
pub(crate) struct Ctx {
    pub(crate) nb: usize,
    pub(crate) n: usize,
    pub(crate) m: usize,
    /// The activation blocks, `m * nb`, row-major: `*const Q8Quants` (Q8_1) or
    /// `*const Q8KBlock` (Q8_K).
    pub(crate) qs: usize,
    /// `*const f32`, `m * nb` (+ pad), block-major: the activation blocks' scales.
    pub(crate) d8: usize,
    /// `*const f32`, `m * nb` (+ pad), block-major: Q8_1's `d * Σq` (unused for Q8_K).
    pub(crate) s8: usize,
    /// `*const i16`, Q8_K only: per block, per pair of 32-value sub-blocks, per row, the two
    /// sub-blocks' sums of quants (`q8_k.rs`), block-major; 0 for Q8_1.
    pub(crate) sums: usize,
    /// `*const` weight blocks of the format, `n * nb`.
    pub(crate) w: usize,
    /// `*mut f32`, `m * n`.
    pub(crate) out: usize,
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

/// How a weight format's kernels take their activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activations {
    /// Q8_1 blocks of 32 (`q8_1.rs`): `Ctx::qs`, `Ctx::d8`, `Ctx::s8`.
    Q8_1,
    /// Q8_K blocks of 256 (`q8_k.rs`): `Ctx::qs` points at `[row][block]` blocks, `Ctx::d8`
    /// and `Ctx::sums` at their scales and sub-block sums, block-major.
    Q8K,
}
