//! Activations quantized to Q8_K (256 values per block: `d: f32`, `qs: [i8; 256]`,
//! `bsums: [i16; 16]`), the left-hand side of the K-quant weight formats (`q6_k.rs`).
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

thread_local! {
    static SCRATCH: RefCell<Vec<CandleQ8K>> = const { RefCell::new(Vec::new()) };
}

/// Quantizes the `m` rows of `lhs` (`m * k` values, `k % 256 == 0`) into this thread's scratch
/// and hands `f` the address of the `m * k / 256` blocks.
pub(crate) fn with_quantized<R>(lhs: &[f32], m: usize, k: usize, f: impl FnOnce(usize) -> R) -> R {
    let nb = k / QK_K;
    SCRATCH.with(|cell| {
        let mut blocks = cell.borrow_mut();
        if blocks.len() < m * nb {
            blocks.resize(m * nb, CandleQ8K::zeros());
        }
        for (row, out) in lhs.chunks_exact(k).zip(blocks.chunks_exact_mut(nb)) {
            CandleQ8K::from_float(row, out);
        }
        f(blocks.as_ptr() as usize)
    })
}
