//! Per-sequence key/value cache, and the one formula for what it costs.

use candle_core::{DType, Device, Result, Tensor};

/// The shape of a model's KV cache: what a model reports ([`crate::CausalLm::kv_layout`]) and
/// the only place the bytes a position takes are computed, for allocation, admission and the
/// node's budget alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes one position takes: keys and values, every layer.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes `positions` positions take.
    pub fn bytes_for(&self, positions: usize) -> usize {
        positions.saturating_mul(self.bytes_per_position())
    }
}

/// The attention keys and values of one sequence, for every layer.
///
/// Each sequence owns its cache, so sequences of different lengths can decode in one batch. The
/// buffers are allocated once, at the capacity the sequence can ever need (prompt plus
/// `max_tokens`, never more than the context window), and written in place: no step re-copies
/// the history the way a `Tensor::cat` cache does.
pub struct KvCache {
    /// Per layer: keys and values, each `(n_kv_heads, capacity, head_dim)`.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(layout: &KvLayout, capacity: usize, device: &Device) -> Result<Self> {
        let shape = (layout.kv_heads, capacity, layout.head_dim);
        let layers = (0..layout.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, layout.dtype, device)?,
                    Tensor::zeros(shape, layout.dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Positions already stored (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`, `v` (`(n_kv_heads, t, head_dim)`) for `layer` after the stored positions and
    /// returns views of the whole history including them. `commit` must follow once every layer
    /// has been written.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        if self.len + t > self.capacity {
            candle_core::bail!(
                "kv cache overflow: {} + {t} positions > capacity {}",
                self.len,
                self.capacity
            );
        }
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.contiguous()?, 1, self.len)?;
        vc.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((
            kc.narrow(1, 0, self.len + t)?,
            vc.narrow(1, 0, self.len + t)?,
        ))
    }

    /// Marks `t` more positions as stored.
    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position from `len` on (after a forward pass that failed once it had
    /// committed): the next write overwrites them.
    pub(crate) fn roll_back_to(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}
