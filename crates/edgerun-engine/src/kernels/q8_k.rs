//! Activations quantized to Q8_K (256 values per block: `d: f32`, `qs: [i8; 256]`,
//! `bsums: [i16; 16]`), the left-hand side of the K-quant weight formats (`q4_k.rs`, `q5_k.rs`, `q6_k.rs`).
//!
//! Every row is quantized by candle's own `BlockQ8K::from_float` (`d = max / -127` for the
//! value of largest magnitude, `q = round(x / d)`), so the integers and scales are those of
//! candle's path. Blocks are row-major (`[row][block]`) in a thread-local scratch reused across
//! calls. The quantization is scalar: it is a small share of a matmul (one pass over `m * k`
//! floats against `n * k` weights).

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
            CandleQ8K::from_float(row, out);
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
