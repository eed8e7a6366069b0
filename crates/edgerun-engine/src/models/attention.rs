//! Attention over KV caches, shared by the architectures: per sequence over contiguous caches,
//! or over a paged pool ([`PagedStep`]: row by row on the CPU, batched on GPUs).
//!
//! On the CPU (an f32 pool) every query row is attended alone, in a fixed order of operations,
//! by [`crate::kernels::attention`]: a row's result is then a function of its query and its
//! history only, the same in a prompt chunk of any length, in a decode batch or alone, so that
//! KV blocks computed while generating equal those a cold node computes reading the same
//! tokens as a prompt, and a prefix-cache hit changes nothing.
//!
//! Elsewhere a paged step costs a fixed number of device operations per layer, whatever the batch: one
//! scatter writes the step's keys and one its values; every decoding sequence (one new token)
//! is served by one gather of all their histories over their block tables, padded to the
//! longest, and one batched attention with a padding mask; only prompt chunks (a few per step)
//! are attended one by one, each with a causal mask, over a gather of their own history. This
//! is paged attention composed of candle's device ops (index_select, scatter, batched matmul,
//! softmax), which the CPU tests exercise step for step; a fused kernel may replace
//! [`PagedStep::attend`] on a device where measurement shows the composition is the cost, and
//! this stays its reference.

use crate::kv_cache::KvPool;
use crate::models::Segment;
use candle_core::{DType, Device, Result, Tensor};

/// Grouped-query attention of one segment over its cache.
/// `q`: `(n_head, t, hd)`; `k`, `v`: `(n_kv, kv_len, hd)`; returns `(t, n_head * hd)`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    groups: usize,
    scale: f64,
) -> Result<Tensor> {
    let (n_head, t, hd) = q.dims3()?;
    let (n_kv, kv_len, _) = k.dims3()?;
    // Query heads sharing a kv head are adjacent, so grouping them turns GQA into one batched
    // matmul per kv head without materialising repeated keys.
    let q = q.reshape((n_kv, groups * t, hd))?;
    let (k, v) = if k.device().is_cpu() && k.dtype() == DType::F32 {
        (k.clone(), v.clone())
    } else {
        (f32_contiguous(k)?, f32_contiguous(v)?)
    };
    let att = (q.matmul(&k.t()?)? * scale)?;
    let att = match mask {
        Some(mask) => att
            .reshape((n_kv, groups, t, kv_len))?
            .broadcast_add(mask)?
            .reshape((n_kv, groups * t, kv_len))?,
        None => att,
    };
    let att = candle_nn::ops::softmax_last_dim(&att)?;
    att.matmul(&v)?
        .reshape((n_head, t, hd))?
        .transpose(0, 1)?
        .reshape((t, n_head * hd))
}

/// `t` as a contiguous f32 tensor: one conversion when the cache is in another dtype (f16 on
/// GPUs), which is also the copy the device's matmul needs.
fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        t.contiguous()
    } else {
        t.to_dtype(DType::F32)
    }
}

/// Additive causal mask for `t` new tokens after `start` cached ones: `(t, start + t)`, 0
/// where a token may look and -inf where it may not. Built on `device` from two position
/// vectors (`t + start + t` values cross to it, not the `t * (start + t)` mask).
pub(crate) fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Tensor> {
    let kv_len = start + t;
    // Positions are exact in f32 up to 2^24, past any context window.
    let query = Tensor::arange(start as f32, kv_len as f32, device)?.reshape((t, 1))?;
    let key = Tensor::arange(0f32, kv_len as f32, device)?.reshape((1, kv_len))?;
    let hidden = key.broadcast_gt(&query)?;
    let shape = (t, kv_len);
    hidden.where_cond(
        &Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(shape)?,
        &Tensor::new(0f32, device)?.broadcast_as(shape)?,
    )
}

/// Additive mask over histories padded to `longest`: `(lens.len(), 1, 1, longest)`, 0 at the
/// first `lens[i]` positions of row `i` and -inf after. Built on `device` from the lengths
/// (`b + longest` values cross to it, not the `b * longest` mask).
fn padding_mask(lens: &[f32], longest: usize, device: &Device) -> Result<Tensor> {
    let b = lens.len();
    let lens = Tensor::from_slice(lens, (b, 1), device)?;
    let positions = Tensor::arange(0f32, longest as f32, device)?.reshape((1, longest))?;
    let shape = (b, longest);
    positions
        .broadcast_ge(&lens)?
        .where_cond(
            &Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as(shape)?,
            &Tensor::new(0f32, device)?.broadcast_as(shape)?,
        )?
        .reshape((b, 1, 1, longest))
}

/// The indices one step over a paged pool needs, built once and used by every layer.
pub(crate) struct PagedStep {
    pool: KvPool,
    total: usize,
    /// `(total, row_width)`: the pool row each new token's keys and values go to.
    write: Tensor,
    decode: Option<DecodeBatch>,
    /// Prompt chunks: (offset in the step, tokens, pool rows of the whole history, mask).
    chunks: Vec<(usize, usize, Tensor, Tensor)>,
    /// Where each token's output row is in `[decode outputs; chunk outputs...]`; `None` when
    /// that order is already the step's.
    order: Option<Tensor>,
    /// On the CPU: every row attended alone ([`crate::kernels::attention`]); `decode`,
    /// `chunks` and `order` are then empty.
    cpu: Option<CpuRows>,
}

/// The histories of a step's rows for the CPU's row-by-row attention.
struct CpuRows {
    /// Per segment: the pool rows of its whole history after this step.
    slots: Vec<Vec<u32>>,
    /// Per segment: (its index in `slots`, its first row's history length, its rows, its
    /// first row in the step).
    spans: Vec<(usize, usize, usize, usize)>,
}

struct DecodeBatch {
    /// `(b,)`: the step rows of the decoding tokens.
    rows: Tensor,
    /// `(b * longest,)`: pool rows of every decoding sequence's history, padded.
    gather: Tensor,
    /// `(b, 1, 1, longest)`: 0 over history, -inf over padding.
    mask: Tensor,
    b: usize,
    longest: usize,
}

impl PagedStep {
    /// The plan for `segments` (all paged, of `pool`) whose tokens start at `bounds[i].0` in
    /// the step, `bounds[i].1` of them, after `bounds[i].2` cached positions.
    pub fn new(
        pool: &KvPool,
        segments: &[Segment<'_>],
        bounds: &[(usize, usize, usize)],
        device: &Device,
    ) -> Result<Self> {
        let total: usize = bounds.iter().map(|b| b.1).sum();
        let width = pool.layout().row_width();
        let mut write = Vec::with_capacity(total);
        for (seg, &(_, t, start)) in segments.iter().zip(bounds) {
            seg.cache.check_room(t)?;
            write.extend(seg.cache.slots(start, t));
        }
        if write.len() != total {
            candle_core::bail!("a paged step over a cache that is not paged");
        }
        let write = Tensor::from_vec(write, (total, 1), device)?
            .broadcast_as((total, width))?
            .contiguous()?;

        if device.is_cpu() && pool.layout().dtype == DType::F32 {
            let mut slots = Vec::with_capacity(segments.len());
            let mut spans = Vec::with_capacity(segments.len());
            for (i, (seg, &(off, t, start))) in segments.iter().zip(bounds).enumerate() {
                slots.push(seg.cache.slots(0, start + t).collect());
                spans.push((i, start + 1, t, off));
            }
            return Ok(Self {
                pool: pool.clone(),
                total,
                write,
                decode: None,
                chunks: Vec::new(),
                order: None,
                cpu: Some(CpuRows { slots, spans }),
            });
        }

        let decoding: Vec<usize> = (0..segments.len()).filter(|&i| bounds[i].1 == 1).collect();
        let decode = if decoding.is_empty() {
            None
        } else {
            let b = decoding.len();
            let longest = decoding.iter().map(|&i| bounds[i].2 + 1).max().unwrap_or(1);
            let mut rows = Vec::with_capacity(b);
            let mut gather = Vec::with_capacity(b * longest);
            let mut lens = Vec::with_capacity(b);
            for &i in &decoding {
                let (off, _, start) = bounds[i];
                let len = start + 1;
                rows.push(off as u32);
                let first = gather.len();
                gather.extend(segments[i].cache.slots(0, len));
                // Padding reads the sequence's first row (any valid row will do: it is masked).
                let pad = gather[first];
                gather.extend(std::iter::repeat_n(pad, longest - len));
                lens.push(len as f32);
            }
            Some(DecodeBatch {
                rows: Tensor::from_vec(rows, b, device)?,
                gather: Tensor::from_vec(gather, b * longest, device)?,
                mask: padding_mask(&lens, longest, device)?,
                b,
                longest,
            })
        };

        let mut chunks = Vec::new();
        for (seg, &(off, t, start)) in segments.iter().zip(bounds) {
            if t > 1 {
                let rows: Vec<u32> = seg.cache.slots(0, start + t).collect();
                let n = rows.len();
                chunks.push((
                    off,
                    t,
                    Tensor::from_vec(rows, n, device)?,
                    causal_mask(t, start, device)?,
                ));
            }
        }

        // Outputs come out as [decodes; chunk 1; chunk 2; ...]: map them back to step order.
        let mut position = vec![0u32; total];
        let mut next = 0u32;
        for &i in &decoding {
            position[bounds[i].0] = next;
            next += 1;
        }
        for &(off, t, _, _) in &chunks {
            for p in &mut position[off..off + t] {
                *p = next;
                next += 1;
            }
        }
        let order = (!position.iter().enumerate().all(|(i, &p)| p as usize == i))
            .then(|| Tensor::from_vec(position, total, device))
            .transpose()?;
        Ok(Self {
            pool: pool.clone(),
            total,
            write,
            decode,
            chunks,
            order,
            cpu: None,
        })
    }

    /// Layer `layer`'s attention for the whole step: stores `k` (`(n_kv, total, hd)`, after
    /// RoPE) and `v` (`(total, n_kv * hd)`) in the pool, then attends `q` (`(n_head, total,
    /// hd)`) over every sequence's history. Returns `(total, n_head * hd)`.
    pub fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        groups: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let (n_head, total, hd) = q.dims3()?;
        let n_kv = n_head / groups;
        let (kp, vp) = self.pool.layer(layer);
        let dtype = kp.dtype();
        let k_rows = k
            .transpose(0, 1)?
            .contiguous()?
            .reshape((total, n_kv * hd))?
            .to_dtype(dtype)?;
        kp.scatter_set(&self.write, &k_rows, 0)?;
        vp.scatter_set(&self.write, &v.to_dtype(dtype)?.contiguous()?, 0)?;
        if let Some(cpu) = &self.cpu {
            return cpu_attend(cpu, q, kp, vp, n_kv, scale);
        }

        let mut outs = Vec::with_capacity(1 + self.chunks.len());
        if let Some(d) = &self.decode {
            let history = |pool: &Tensor| -> Result<Tensor> {
                let h = pool
                    .index_select(&d.gather, 0)?
                    .reshape((d.b, d.longest, n_kv, hd))?
                    .transpose(1, 2)?;
                f32_contiguous(&h)
            };
            let (kh, vh) = (history(kp)?, history(vp)?); // (b, n_kv, longest, hd)
            let qd = q
                .index_select(&d.rows, 1)? // (n_head, b, hd)
                .transpose(0, 1)?
                .contiguous()?
                .reshape((d.b, n_kv, groups, hd))?;
            let att = (qd.matmul(&kh.t()?)? * scale)?.broadcast_add(&d.mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            outs.push(att.matmul(&vh)?.reshape((d.b, n_head * hd))?);
        }
        for (off, t, rows, mask) in &self.chunks {
            let history = |pool: &Tensor| -> Result<Tensor> {
                pool.index_select(rows, 0)?
                    .reshape((rows.dim(0)?, n_kv, hd))?
                    .transpose(0, 1)
            };
            let q_s = q.narrow(1, *off, *t)?.contiguous()?;
            outs.push(attention(
                &q_s,
                &f32_contiguous(&history(kp)?)?,
                &f32_contiguous(&history(vp)?)?,
                Some(mask),
                groups,
                scale,
            )?);
        }
        let y = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        debug_assert_eq!(y.dim(0)?, self.total);
        match &self.order {
            Some(order) => y.index_select(order, 0),
            None => Ok(y),
        }
    }
}

/// The CPU's row-by-row attention over an f32 pool (see the module docs).
fn cpu_attend(
    plan: &CpuRows,
    q: &Tensor,
    kp: &Tensor,
    vp: &Tensor,
    n_kv: usize,
    scale: f64,
) -> Result<Tensor> {
    use crate::kernels::attention::Span;
    use candle_core::Storage;
    let (n_head, total, hd) = q.dims3()?;
    let q = q
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let spans: Vec<Span<'_>> = plan
        .spans
        .iter()
        .map(|&(seg, first_len, rows, row0)| Span {
            slots: &plan.slots[seg],
            first_len,
            rows,
            row0,
        })
        .collect();
    let (ks, kl) = kp.storage_and_layout();
    let (vs, vl) = vp.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        candle_core::bail!("the CPU's paged attention over a pool that is not on the CPU");
    };
    let n = kp.elem_count();
    let k = &kc.as_slice::<f32>()?[kl.start_offset()..][..n];
    let v = &vc.as_slice::<f32>()?[vl.start_offset()..][..n];
    let heads = crate::kernels::attention::Heads {
        n_head,
        n_kv,
        hd,
        scale: scale as f32,
    };
    let out = crate::kernels::attention::paged_attention(&q, k, v, &spans, total, heads);
    Tensor::from_vec(out, (total, n_head * hd), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_masks_hide_exactly_the_padding() -> Result<()> {
        let mask = padding_mask(&[1.0, 3.0, 4.0], 4, &Device::Cpu)?;
        assert_eq!(mask.dims(), &[3, 1, 1, 4]);
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            mask.flatten_all()?.to_vec1::<f32>()?,
            [[0.0, inf, inf, inf], [0.0, 0.0, 0.0, inf], [0.0; 4]].concat()
        );
        Ok(())
    }

    #[test]
    fn causal_masks_hide_exactly_the_later_positions() -> Result<()> {
        for (t, start) in [(1, 0), (1, 5), (3, 0), (4, 7), (17, 33)] {
            let mask = causal_mask(t, start, &Device::Cpu)?.to_vec2::<f32>()?;
            assert_eq!(mask.len(), t);
            for (i, row) in mask.iter().enumerate() {
                assert_eq!(row.len(), start + t);
                for (j, &m) in row.iter().enumerate() {
                    let expected = if j > start + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    };
                    assert_eq!(m, expected, "t {t}, start {start}, row {i}, column {j}");
                }
            }
        }
        Ok(())
    }
}
