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
//! * `dispatch.rs`: [`QLinear`], [`FusedLinear`] and [`Kernels`], the seam above;
//!   `driver.rs`: the thread-pool driver every CPU format shares (`matmul_with`,
//!   `forward_cpu`, the `CpuMatrix` trait a format implements); `storage.rs`: how a matrix
//!   holds the file's blocks ([`InPlaceMatrix`], [`TiledMatrix`]); `test_util.rs`: the
//!   kernels' shared test checks.
//! * [`dense_f32`]: f32 weights (the encoders', not GGUF's): [`dense_f32::DenseF32`], repacked
//!   into 32-output panels, AVX-512 or AVX2 tiles (the same bits); `models/bert/cpu.rs` calls
//!   it directly (the [`QLinear`] seam is for quantized GGUF tensors).
//! * one file per **block format**: weights [`q4_1`], [`q8_0`] (with Q8_1 activations,
//!   `q8_1`) and [`q4_k`], [`q5_k`], [`q6_k`] (with Q8_K activations, `q8_k`); activations are
//!   quantized once per call. The thread-pool driver (`matmul_with`) and the tensor plumbing
//!   (`forward_cpu`) are shared by all; the `*_1` formats share a tiling
//!   (`avx2_tile_driver!`), Q4_K and Q5_K share theirs (`q4_k::avx2::rows`, over a
//!   `ScaleMinBlock`). A new format is a new file with its block type, a matrix type holding
//!   the GGUF bytes as they are, its `CpuMatrix` impl (activation format, kernels per ISA),
//!   and one arm in [`QLinear::new`].
//! * `attention.rs`: the CPU's attention over the paged KV pool, one query row at a time in a
//!   fixed order of operations, so that a row's result never depends on the rows beside it
//!   (what makes the prefix cache exact on the CPU); `models/attention.rs` calls it.
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

pub(crate) mod attention;
pub mod cpu;
pub mod dense_f32;
mod dispatch;
mod driver;
pub mod q4_1;
pub mod q4_k;
pub mod q4_k_tiled;
pub mod q5_0;
pub mod q5_k;
pub mod q6_k;
pub mod q6_k_tiled;
pub mod q8_0;
mod q8_1;
mod q8_k;
mod storage;
#[cfg(test)]
pub(crate) mod test_util;

pub use q4_1::{matmul_q4_1, BlockQ4_1, Q4_1Matrix};
pub use q4_k::Q4KMatrix;
pub use q4_k_tiled::Q4KTiled;
pub use q5_0::{BlockQ5_0, Q5_0Matrix};
pub use q5_k::Q5KMatrix;
pub use q6_k::Q6KMatrix;
pub use q6_k_tiled::Q6KTiled;
pub use q8_0::{BlockQ8_0, Q8_0Matrix};

pub use dispatch::{FusedLinear, Kernels, QLinear};
pub(crate) use driver::{forward_cpu, matmul_with, Activations, CpuMatrix, Ctx};
pub use storage::{InPlaceMatrix, TiledMatrix, TILE_ROWS};

/// Values per quantization block (Q4_1 and Q8_1 alike).
pub const QK: usize = 32;

/// Values per K-quant super-block (Q6_K and Q8_K alike).
pub const QK_K: usize = 256;
