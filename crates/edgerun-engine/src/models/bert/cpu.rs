//! BERT's forward on an x86 CPU (AVX-512 or AVX2), without candle: the same math as [`super::CandleBert`]
//! (and `transformers`' `BertModel`), laid out for the CPU.
//!
//! * **No padding.** The batch's texts are packed one after another into a `(tokens, hidden)`
//!   matrix; the linear layers ([`DenseF32`], weights repacked once at load) run over all of
//!   it, attention runs per text and head over that text's rows only. A batch of texts of
//!   mixed lengths costs the sum of their lengths, not count × longest, and a text's vector
//!   does not depend on the texts beside it (every step is row-invariant or per text).
//! * **No fresh buffers.** The activations live in one [`Scratch`] kept between batches;
//!   batches are cut into chunks of at most [`CHUNK_TOKENS`] tokens (a text is never split), so
//!   it stays at `CHUNK_TOKENS + max length` rows of `6 × hidden + intermediate` floats
//!   (~45 MB for all-MiniLM, ~120 MB for bge-large).
//! * **Fused steps.** GELU runs in the up-projection's epilogue while its tile is in L1; each
//!   residual add runs inside its layer norm.
//!
//! Work is shared over the kernels' thread pool: the linear layers by (row block, panel),
//! attention by (text, head), embeddings and norms by rows.

use super::BertConfig;
use crate::embedding::Pooling;
use crate::error::{EngineError, Result};
use crate::kernels::attention::exp_nonpositive;
use crate::kernels::cpu::parallel_chunks;
use crate::kernels::dense_f32::{Activation, DenseF32, Panels};
use std::sync::Mutex;

/// The most tokens one forward pass holds (a longer batch runs as several).
pub const CHUNK_TOKENS: usize = 2048;

/// A layer norm's weights; [`Norm::apply`] normalises a row in place.
pub(super) struct Norm {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Vec<f32>,
    pub(super) eps: f32,
}

impl Norm {
    /// `row = LayerNorm(row + add)` (population variance, as PyTorch).
    fn apply(&self, row: &mut [f32], add: Option<&[f32]>) {
        if let Some(add) = add {
            row.iter_mut().zip(add).for_each(|(r, a)| *r += a);
        }
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
            *v = ((*v - mean) * inv).mul_add(*w, *b);
        }
    }
}

pub(super) struct Layer {
    pub(super) qkv: DenseF32,
    pub(super) attn_out: DenseF32,
    pub(super) attn_norm: Norm,
    pub(super) up: DenseF32,
    pub(super) down: DenseF32,
    pub(super) out_norm: Norm,
}

/// The activations of one forward pass, kept between batches.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    up: Vec<f32>,
}

/// A BERT encoder's weights, packed for [`DenseF32`].
pub(super) struct PackedBert {
    pub(super) hidden: usize,
    pub(super) heads: usize,
    pub(super) intermediate: usize,
    pub(super) act: Activation,
    pub(super) vocab: usize,
    pub(super) max_positions: usize,
    /// `(vocab, hidden)`.
    pub(super) words: Vec<f32>,
    /// `(max_positions, hidden)`.
    pub(super) positions: Vec<f32>,
    /// Token type 0's embedding (every input is one segment).
    pub(super) type0: Vec<f32>,
    pub(super) embed_norm: Norm,
    pub(super) layers: Vec<Layer>,
    scratch: Mutex<Scratch>,
}

/// A pointer to rows that units of a parallel loop write disjointly.
struct Rows(*mut f32);
// SAFETY: every parallel loop below writes each row from exactly one unit.
unsafe impl Sync for Rows {}

impl Rows {
    /// Row `i` of width `w`.
    ///
    /// # Safety
    /// Within the buffer, and no other live reference to that row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, w: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(i * w), w)
    }

    /// The value at `offset`.
    ///
    /// # Safety
    /// Within the buffer.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

impl PackedBert {
    pub(super) fn new(config: &BertConfig, act: Activation) -> Self {
        Self {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            act,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
            words: Vec::new(),
            positions: Vec::new(),
            type0: Vec::new(),
            embed_norm: Norm {
                weight: Vec::new(),
                bias: Vec::new(),
                eps: config.layer_norm_eps as f32,
            },
            layers: Vec::new(),
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// The pooled (not normalised) vector of each text.
    pub(super) fn pooled(&self, texts: &[&[u32]], poolings: &[Pooling]) -> Result<Vec<Vec<f32>>> {
        for (i, t) in texts.iter().enumerate() {
            if t.is_empty() || t.len() > self.max_positions {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has {} tokens; the encoder reads 1 to {}",
                    t.len(),
                    self.max_positions
                )));
            }
            if let Some(bad) = t.iter().find(|&&id| id as usize >= self.vocab) {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i}: token {bad} is not in the model's vocabulary of {}",
                    self.vocab
                )));
            }
        }
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let h = self.hidden;
        let mut out = Vec::with_capacity(texts.len());
        let mut start = 0;
        while start < texts.len() {
            let (mut end, mut total) = (start, 0);
            while end < texts.len() && (end == start || total + texts[end].len() <= CHUNK_TOKENS) {
                total += texts[end].len();
                end += 1;
            }
            let hidden = self.forward(&texts[start..end], &mut scratch);
            let mut row = 0;
            for (text, pooling) in texts[start..end].iter().zip(&poolings[start..end]) {
                let rows = &hidden[row * h..(row + text.len()) * h];
                out.push(match pooling {
                    Pooling::Cls => rows[..h].to_vec(),
                    Pooling::Mean => {
                        let mut sum = vec![0f32; h];
                        for r in rows.chunks_exact(h) {
                            sum.iter_mut().zip(r).for_each(|(s, v)| *s += v);
                        }
                        let n = text.len() as f32;
                        sum.iter_mut().for_each(|s| *s /= n);
                        sum
                    }
                });
                row += text.len();
            }
            start = end;
        }
        Ok(out)
    }

    /// The last hidden states of `texts`, packed one after another (`(Σ len, hidden)`).
    fn forward<'s>(&self, texts: &[&[u32]], s: &'s mut Scratch) -> &'s [f32] {
        let h = self.hidden;
        let t: usize = texts.iter().map(|t| t.len()).sum();
        for (buf, width) in [
            (&mut s.x, h),
            (&mut s.qkv, 3 * h),
            (&mut s.ctx, h),
            (&mut s.tmp, h),
            (&mut s.up, self.intermediate),
        ] {
            buf.resize(t * width, 0.0);
        }
        let mut spans = Vec::with_capacity(texts.len());
        let mut tokens = Vec::with_capacity(t);
        for text in texts {
            spans.push((tokens.len(), text.len()));
            tokens.extend(text.iter().enumerate().map(|(p, &id)| (id as usize, p)));
        }
        let x = Rows(s.x.as_mut_ptr());
        parallel_chunks(t, |range| {
            for i in range {
                let (id, pos) = tokens[i];
                // SAFETY: row i < t of x, written by this unit only.
                let row = unsafe { x.row(i, h) };
                let (w, p) = (&self.words[id * h..][..h], &self.positions[pos * h..][..h]);
                for j in 0..h {
                    row[j] = w[j] + p[j] + self.type0[j];
                }
                self.embed_norm.apply(row, None);
            }
        });
        for layer in &self.layers {
            layer
                .qkv
                .forward(&s.x[..t * h], &mut s.qkv, Activation::None);
            self.attention(&spans, &s.qkv, &mut s.ctx);
            layer.attn_out.forward(&s.ctx, &mut s.tmp, Activation::None);
            add_norm(&mut s.x, &s.tmp, h, &layer.attn_norm);
            layer.up.forward(&s.x, &mut s.up, self.act);
            layer.down.forward(&s.up, &mut s.tmp, Activation::None);
            add_norm(&mut s.x, &s.tmp, h, &layer.out_norm);
        }
        &s.x[..t * h]
    }

    /// Scaled dot-product attention of each text over its own rows, per head: `ctx` rows
    /// from `qkv`'s `[q | k | v]` rows. Both products run the linear layers' micro-tile: the
    /// head's keys packed as the weights of `q·kᵀ` (an output per key), then its values as the
    /// weights of `p·v` (an output per dimension).
    fn attention(&self, spans: &[(usize, usize)], qkv: &[f32], ctx: &mut [f32]) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let out = Rows(ctx.as_mut_ptr());
        parallel_chunks(spans.len() * heads, |units| {
            let (mut keys, mut values) = (Panels::default(), Panels::default());
            let mut scores = Vec::new();
            for unit in units {
                let ((start, len), head) = (spans[unit / heads], unit % heads);
                let base = start * 3 * h + head * d;
                keys.pack(len, d, |j, p| qkv[base + j * 3 * h + h + p]);
                scores.resize(len * len, 0.0);
                keys.matmul(&qkv[base..], 3 * h, len, &mut scores, len);
                for row in scores.chunks_exact_mut(len) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                    let mut sum = 0.0;
                    for s in row.iter_mut() {
                        *s = exp_nonpositive(s.mul_add(scale, -max));
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|s| *s *= inv);
                }
                values.pack_rows(d, len, |j| &qkv[base + j * 3 * h + 2 * h..][..d]);
                // SAFETY: rows start..start + len of ctx, this head's d columns of each: no
                // other unit writes them.
                unsafe { values.matmul_to(&scores, len, len, out.at(start * h + head * d), h) };
            }
        });
    }
}

/// `x[i] = norm(x[i] + add[i])` for every row, in parallel.
fn add_norm(x: &mut [f32], add: &[f32], h: usize, norm: &Norm) {
    let rows = x.len() / h;
    let xs = Rows(x.as_mut_ptr());
    parallel_chunks(rows, |range| {
        for i in range {
            // SAFETY: row i of x, this unit's only.
            let row = unsafe { xs.row(i, h) };
            norm.apply(row, Some(&add[i * h..(i + 1) * h]));
        }
    });
}
