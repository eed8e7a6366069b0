//! How our CPU kernels hold a GGUF matrix: [`InPlaceMatrix`] reads the file's blocks where
//! candle loaded them (no second copy); [`TiledMatrix`] reorders them once into tiles of
//! [`TILE_ROWS`] rows that replace the blocks.

use super::*;
use candle_core::quantized::QTensor;
use candle_core::Result;
use std::sync::Arc;

/// A weight matrix read in place from candle's CPU tensor of `B` blocks (rows of `k / block`
/// blocks, one after the other): no copy of the weights, and the tensor may stay shared with
/// others (tied embeddings). Each format's file gives it a `from_qtensor` and a `CpuMatrix`
/// impl ([`Q8_0Matrix`], [`Q6KMatrix`]).
pub struct InPlaceMatrix<B> {
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// Keeps the blocks alive; never mutated.
    pub(crate) tensor: Arc<QTensor>,
    /// Address of the first block inside `tensor`'s storage.
    pub(crate) addr: usize,
    pub(crate) _block: std::marker::PhantomData<B>,
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
    pub(crate) fn new(
        t: &Arc<QTensor>,
        dtype: candle_core::quantized::GgmlDType,
    ) -> Result<Option<Self>> {
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
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) tiles: Vec<T>,
}

impl<T> TiledMatrix<T> {
    /// `Some(..)` when `t` is a 2-D `dtype` tensor on the CPU with a multiple of 16 rows of a
    /// multiple of 256 values (GGML blocks `B` of 256 values): each tile is `pack` of its 16
    /// rows' blocks. `None` for anything else. The caller drops `t` afterwards: the tiles are
    /// the only copy of the weights.
    pub(crate) fn repack<B: Copy>(
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
