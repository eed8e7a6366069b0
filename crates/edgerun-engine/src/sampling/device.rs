//! Sampling a whole step's rows where the logits are: only token ids cross to the host.
//!
//! The definition is [`Sampler`](super::Sampler)'s, step for step; this is its batched form,
//! built from candle's device ops alone (compare, `where_cond`, `exp`, sums, `index_select`,
//! `gather`, `scatter_set`, small matmuls, and `arg_sort` over rows of at most 8,192 values,
//! the widest that candle's CUDA sort holds in shared memory). The CPU tests run these ops
//! against the host sampler; a GPU runs the same ops as kernels.
//!
//! Per step, over the rows the scheduler hands it (one per sequence sampling a token, each
//! with its own parameters and the uniform its generator drew, [`DeviceRow`]):
//! 1. **Penalties**: every row's edits at once, one gather and one `scatter_set` over the
//!    flattened logits.
//! 2. **Greedy rows**: [`device_argmax`](super::device_argmax), ties to the lowest id.
//! 3. **Rows that draw from the whole vocabulary** (no cut): the weights `exp(l/T - max)`
//!    summed in blocks of [`CDF_BLOCK`]; the block where the running total crosses `u * total`
//!    is found with one small triangular matmul over the block sums, then the token inside it
//!    with another over that block's weights.
//! 4. **Rows with a cut** (top-k, top-p): the best [`DeviceSampler::candidates`] tokens, by
//!    sorting blocks of [`SORT_BLOCK`] values and then the blocks' best together; ties put in
//!    the canonical order (lower id first) by ranking the candidates against each other;
//!    then top-k, top-p and the draw over that short, sorted list, as the host does.
//!
//! A row comes back `None` (the caller copies its logits and the host sampler finishes it,
//! with the same uniform) only where the short list cannot decide it exactly: a top-k above
//! the list, a nucleus wider than the list or cut inside a tie at its end, a row without
//! finite logits, or a draw that rounding pushed past the last candidate.
//!
//! **Log-probabilities** ([`DeviceSampler::logprobs`]), for the rows that report them, after
//! the draw: the raw row's log-sum-exp over finite logits, the chosen token's logit, and the
//! `top` best from the same two-pass sort in canonical order; a few values per row come back
//! and the host finishes [`super::step_logprobs`]'s arithmetic on them. A row comes back
//! `None` (copied whole, sampled and reported by the host with the same uniform: the same
//! token) for a `top` above the list, a top list cut inside a tie at the list's end, or no
//! finite logit.

use candle_core::{DType, Device, Result, Tensor};

/// The widest row candle's CUDA `arg_sort` sorts (its shared memory holds the whole row).
const SORT_WIDTH: usize = 8192;
/// Values sorted together in the first pass over a row.
const SORT_BLOCK: usize = 4096;
/// The most candidates kept for a cut (top-k above `CANDIDATES - 1` is finished on the host).
const CANDIDATES: usize = 256;
/// Weights summed together when drawing from the whole vocabulary.
const CDF_BLOCK: usize = 256;
/// Running sums and totals of weights, as the host sampler keeps them: f32 sums of 128k
/// weights in two different orders differ by more than a small token's weight.
const SUMS: DType = DType::F64;

/// One row's sampling, resolved by its [`Sampler`](super::Sampler).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    /// `<= 0`: the argmax (after penalties).
    pub temperature: f32,
    /// `0`: no cut.
    pub top_k: usize,
    /// `>= 1`: no cut.
    pub top_p: f32,
    /// The uniform in `[0, 1)` the sequence's generator drew for this token.
    pub u: f32,
    /// Edits of single logits, by token, each token once.
    pub penalties: Vec<Penalty>,
    /// `Some(top)`: the token's log-probabilities are reported, with the `top` most likely
    /// ([`DeviceSampler::logprobs`], after the draw; [`DeviceSampler::sample`] ignores it).
    pub top_logprobs: Option<usize>,
}

/// A penalty on one token's logit: divided by `divide` when positive (multiplied when not),
/// then `subtract` taken off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalty {
    pub token: u32,
    pub divide: f32,
    pub subtract: f32,
}

/// What a step's sampling needs on the device, built once per vocabulary.
pub struct DeviceSampler {
    vocab: usize,
    device: Device,
    /// `vocab - i` at `i`, for ties to the lowest id ([`super::argmax_weights`]).
    lowest_first: Tensor,
    /// Values per first-pass sort block (`<= SORT_BLOCK`), and blocks per row.
    sort_block: usize,
    sort_blocks: usize,
    /// Candidates kept per block and in all.
    candidates: usize,
    /// Blocks of [`CDF_BLOCK`] weights per row.
    cdf_blocks: usize,
    /// Inclusive prefix sums as matmuls: ones on and above the diagonal.
    triu_candidates: Tensor,
    triu_cdf_block: Tensor,
    triu_cdf_blocks: Tensor,
    /// Exclusive prefix sums over the blocks: ones above the diagonal.
    strict_triu_cdf_blocks: Tensor,
}

impl DeviceSampler {
    pub fn new(vocab: usize, device: &Device) -> Result<Self> {
        if vocab == 0 || vocab >= 1 << 24 {
            candle_core::bail!(
                "device sampling needs a vocabulary of 1 to 2^24 tokens, not {vocab}"
            );
        }
        let sort_block = vocab.min(SORT_BLOCK);
        let sort_blocks = vocab.div_ceil(sort_block);
        // The second pass sorts every block's best together, in one row of at most SORT_WIDTH.
        let candidates = (SORT_WIDTH / sort_blocks).min(CANDIDATES).min(sort_block);
        if candidates < 2 {
            candle_core::bail!("device sampling cannot sort a vocabulary of {vocab} tokens");
        }
        let cdf_blocks = vocab.div_ceil(CDF_BLOCK);
        let triu = |n| Tensor::triu2(n, SUMS, device);
        let triu_cdf_blocks = triu(cdf_blocks)?;
        let strict_triu_cdf_blocks = (&triu_cdf_blocks - Tensor::eye(cdf_blocks, SUMS, device)?)?;
        Ok(Self {
            vocab,
            device: device.clone(),
            lowest_first: super::argmax_weights(vocab, device)?,
            sort_block,
            sort_blocks,
            candidates,
            cdf_blocks,
            triu_candidates: triu(candidates)?,
            triu_cdf_block: triu(CDF_BLOCK)?,
            triu_cdf_blocks,
            strict_triu_cdf_blocks,
        })
    }

    /// The most candidates a cut is decided among: a top-k must stay below it.
    pub fn candidates(&self) -> usize {
        self.candidates
    }

    /// The token of each row of `logits` (`(rows.len(), vocab)`, f32, as the model gave them),
    /// or `None` where the host must finish the row.
    pub fn sample(&self, logits: &Tensor, rows: &[DeviceRow]) -> Result<Vec<Option<u32>>> {
        let (n, vocab) = logits.dims2()?;
        if n != rows.len() || vocab != self.vocab {
            candle_core::bail!(
                "device sampling of {n} rows of {vocab} for {} rows of {}",
                rows.len(),
                self.vocab
            );
        }
        let mut out = vec![None; n];
        if n == 0 {
            return Ok(out);
        }
        let logits = self.penalized(&logits.to_dtype(DType::F32)?, rows)?;
        let group = |keep: &dyn Fn(&DeviceRow) -> bool| -> Vec<usize> {
            (0..n).filter(|&i| keep(&rows[i])).collect()
        };
        let greedy = group(&|r| r.temperature <= 0.0);
        let whole = group(&|r| r.temperature > 0.0 && !self.cuts(r));
        let cut = group(&|r| r.temperature > 0.0 && self.cuts(r));
        type Draw<'a> = &'a dyn Fn(&Tensor, &[&DeviceRow]) -> Result<Vec<Option<u32>>>;
        let argmax = |t: &Tensor, _: &[&DeviceRow]| -> Result<Vec<Option<u32>>> {
            let tokens = super::device_argmax(t, &self.lowest_first)?;
            Ok(tokens.into_iter().map(Some).collect())
        };
        let paths: [(Vec<usize>, Draw<'_>); 3] = [
            (greedy, &argmax),
            (whole, &|t, r| self.draw_whole(t, r)),
            (cut, &|t, r| self.draw_cut(t, r)),
        ];
        for (which, draw) in paths.into_iter().filter(|(w, _)| !w.is_empty()) {
            let picked = draw(&self.select(&logits, &which)?, &pick(rows, &which))?;
            for (&i, t) in which.iter().zip(picked) {
                out[i] = t;
            }
        }
        Ok(out)
    }

    /// The log-probabilities [`super::step_logprobs`] reports for tokens sampled here, from
    /// the raw `logits` (`(chosen.len(), vocab)`, as the model gave them): each row's chosen
    /// token and its `top[i]` most likely, read back in one copy of a few values per row
    /// instead of the row. `None` where the host must compute them from the copied row: a
    /// `top` the candidate list cannot hold, a top list cut inside a tie at the list's end, a
    /// row without finite logits. The values are the host's up to the order of the f32 sums
    /// (a few ulp).
    pub fn logprobs(
        &self,
        logits: &Tensor,
        chosen: &[u32],
        top: &[usize],
    ) -> Result<Vec<Option<super::StepLogprobs>>> {
        let (n, vocab) = logits.dims2()?;
        if n != chosen.len() || n != top.len() || vocab != self.vocab {
            candle_core::bail!(
                "device log-probabilities of {n} rows of {vocab} for {} rows of {}",
                chosen.len(),
                self.vocab
            );
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let raw = logits.to_dtype(DType::F32)?;
        let neg_inf = Tensor::full(f32::NEG_INFINITY, raw.shape(), &self.device)?;
        // The log-sum-exp over finite logits, as the host computes it.
        let finite = raw.sub(&raw)?.eq(0f32)?.where_cond(&raw, &neg_inf)?;
        let max = finite.max_keepdim(1)?;
        let log_sum = finite
            .broadcast_sub(&max)?
            .exp()?
            .to_dtype(SUMS)?
            .sum_keepdim(1)?
            .log()?
            .to_dtype(DType::F32)?;
        let log_total = (&max + log_sum)?;
        let at = Tensor::from_vec(chosen.to_vec(), (n, 1), &self.device)?;
        let chosen_logit = raw.gather(&at, 1)?;
        let mut head = vec![log_total, max, chosen_logit];
        let c = self.candidates;
        let want = top.iter().copied().max().unwrap_or(0).min(c);
        let mut best = None;
        if want > 0 {
            // NaN sorts as -inf (the host's order), +inf stays first.
            let clean = raw.ne(&raw)?.where_cond(&neg_inf, &raw)?;
            let (values, ids) = self.best(&clean)?;
            let (values, ids) = self.canonical_order(&values, &ids)?;
            head.push(values.narrow(1, c - 1, 1)?);
            best = Some((
                values.narrow(1, 0, want)?.to_vec2::<f32>()?,
                ids.narrow(1, 0, want)?.to_vec2::<u32>()?,
            ));
        }
        let head = Tensor::cat(&head, 1)?.to_vec2::<f32>()?;
        let complete = c == self.vocab;
        Ok((0..n)
            .map(|i| {
                let (log_total, max, chosen_logit) = (head[i][0], head[i][1], head[i][2]);
                let k = top[i];
                if max == f32::NEG_INFINITY || k > c {
                    return None;
                }
                let lp = |l| super::logprob_of(l, log_total);
                let top = match &best {
                    Some((values, ids)) if k > 0 => {
                        let least = head[i][3];
                        if !complete && values[i][k - 1] <= least {
                            return None;
                        }
                        (0..k).map(|j| (ids[i][j], lp(values[i][j]))).collect()
                    }
                    _ => Vec::new(),
                };
                Some(super::StepLogprobs {
                    chosen: (chosen[i], lp(chosen_logit)),
                    top,
                })
            })
            .collect())
    }

    /// Whether a row's draw is cut (top-k below the vocabulary, or top-p below 1).
    fn cuts(&self, row: &DeviceRow) -> bool {
        (row.top_k > 0 && row.top_k < self.vocab) || row.top_p < 1.0
    }

    fn select(&self, t: &Tensor, rows: &[usize]) -> Result<Tensor> {
        if rows.len() == t.dim(0)? {
            return Ok(t.clone());
        }
        t.index_select(&self.ids(rows.iter().map(|&i| i as u32).collect())?, 0)
    }

    fn ids(&self, ids: Vec<u32>) -> Result<Tensor> {
        let n = ids.len();
        Tensor::from_vec(ids, n, &self.device)
    }

    fn column(&self, values: Vec<f32>) -> Result<Tensor> {
        let n = values.len();
        Tensor::from_vec(values, (n, 1), &self.device)
    }

    /// Each row's uniform times its total, `(n, 1)` in [`SUMS`] (the host's `u as f64 * total`).
    fn target(&self, rows: &[&DeviceRow], total: &Tensor) -> Result<Tensor> {
        let u: Vec<f64> = rows.iter().map(|r| f64::from(r.u)).collect();
        let n = u.len();
        total.broadcast_mul(&Tensor::from_vec(u, (n, 1), &self.device)?)
    }

    /// The logits with every row's penalties applied (a copy; the model's stay as they are).
    fn penalized(&self, logits: &Tensor, rows: &[DeviceRow]) -> Result<Tensor> {
        let mut at = Vec::new();
        let mut divide = Vec::new();
        let mut subtract = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            for p in row
                .penalties
                .iter()
                .filter(|p| (p.token as usize) < self.vocab)
            {
                at.push((i * self.vocab) as u32 + p.token);
                divide.push(p.divide);
                subtract.push(p.subtract);
            }
        }
        if at.is_empty() {
            return Ok(logits.clone());
        }
        let n = at.len();
        let at = self.ids(at)?;
        let divide = Tensor::from_vec(divide, n, &self.device)?;
        let subtract = Tensor::from_vec(subtract, n, &self.device)?;
        let flat = logits.flatten_all()?.copy()?;
        let seen = flat.index_select(&at, 0)?;
        let edited = seen
            .gt(0f32)?
            .where_cond(&(&seen / &divide)?, &(&seen * &divide)?)?;
        flat.scatter_set(&at, &(edited - subtract)?, 0)?;
        flat.reshape(logits.shape())
    }

    /// `l / T` for the finite logits, `-inf` elsewhere, and the row maxima `(n, 1)`.
    fn scaled(&self, logits: &Tensor, rows: &[&DeviceRow]) -> Result<(Tensor, Tensor)> {
        let t = self.column(rows.iter().map(|r| r.temperature).collect())?;
        let scaled = logits.broadcast_div(&t)?;
        // Finite exactly where x - x is 0 (inf - inf and NaN are NaN).
        let finite = logits.sub(logits)?.eq(0f32)?;
        let neg_inf = Tensor::full(f32::NEG_INFINITY, scaled.shape(), &self.device)?;
        let scaled = finite.where_cond(&scaled, &neg_inf)?;
        let max = scaled.max_keepdim(1)?;
        Ok((scaled, max))
    }

    /// Draws over the whole vocabulary, in vocabulary order.
    fn draw_whole(&self, logits: &Tensor, rows: &[&DeviceRow]) -> Result<Vec<Option<u32>>> {
        let n = rows.len();
        let (scaled, max) = self.scaled(logits, rows)?;
        let weights = scaled.broadcast_sub(&max)?.exp()?.to_dtype(SUMS)?;
        let padded = self.cdf_blocks * CDF_BLOCK;
        let weights = if padded > self.vocab {
            let zeros = Tensor::zeros((n, padded - self.vocab), SUMS, &self.device)?;
            Tensor::cat(&[&weights, &zeros], 1)?
        } else {
            weights
        };
        let blocked = weights.reshape((n * self.cdf_blocks, CDF_BLOCK))?;
        let sums = blocked.sum(1)?.reshape((n, self.cdf_blocks))?;
        let total = sums.sum_keepdim(1)?;
        let r = self.target(rows, &total)?;
        // The block holding the crossing: the number of blocks whose running total is <= r.
        let running = sums.matmul(&self.triu_cdf_blocks)?;
        let block = running.broadcast_le(&r)?.to_dtype(SUMS)?.sum_keepdim(1)?;
        let last = (self.cdf_blocks - 1) as f64;
        let block_c = block.clamp(0f64, last)?.to_dtype(DType::U32)?;
        let before = sums
            .matmul(&self.strict_triu_cdf_blocks)?
            .gather(&block_c, 1)?;
        let row_base = Tensor::arange(0u32, n as u32, &self.device)?
            .affine(self.cdf_blocks as f64, 0.0)?
            .reshape((n, 1))?;
        let which = (row_base + &block_c)?.flatten_all()?;
        let inside = blocked
            .index_select(&which, 0)?
            .matmul(&self.triu_cdf_block)?
            .broadcast_add(&before)?;
        let offset = inside.broadcast_le(&r)?.to_dtype(SUMS)?.sum_keepdim(1)?;
        // Decided where the crossing lies inside a block and every row had a finite logit.
        let ok = block
            .lt(self.cdf_blocks as f64)?
            .mul(&offset.lt(CDF_BLOCK as f64)?)?
            .mul(&max.ne(f32::NEG_INFINITY)?)?;
        let token = (block.clamp(0f64, last)?.affine(CDF_BLOCK as f64, 0.0)? + offset)?;
        decided(&token.to_dtype(DType::F32)?, &ok)
    }

    /// Top-k, top-p and the draw over each row's best candidates.
    fn draw_cut(&self, logits: &Tensor, rows: &[&DeviceRow]) -> Result<Vec<Option<u32>>> {
        let c = self.candidates;
        let (scaled, max) = self.scaled(logits, rows)?;
        // The whole vocabulary's mass, for a nucleus without top-k.
        let total_all = scaled
            .broadcast_sub(&max)?
            .exp()?
            .to_dtype(SUMS)?
            .sum_keepdim(1)?;
        let (values, ids) = self.best(&scaled)?;
        let (values, ids) = self.canonical_order(&values, &ids)?;
        let positions = Tensor::arange(0u32, c as u32, &self.device)?
            .to_dtype(DType::F32)?
            .reshape((1, c))?;
        let has_k = |r: &DeviceRow| r.top_k > 0 && r.top_k < self.vocab;
        // Rows whose top-k the list cannot hold are the host's (not kept here: `limit` c).
        let k = self.column(
            rows.iter()
                .map(|r| {
                    if has_k(r) {
                        r.top_k.min(c) as f32
                    } else {
                        c as f32
                    }
                })
                .collect(),
        )?;
        let with_k = self.column(rows.iter().map(|r| has_k(r) as u8 as f32).collect())?;
        let weights = values.broadcast_sub(&max)?.exp()?.to_dtype(SUMS)?;
        let in_k = positions.broadcast_lt(&k)?;
        let weights_k = in_k.where_cond(&weights, &weights.zeros_like()?)?;
        let sum_k = weights_k.sum_keepdim(1)?;
        let total = with_k.ne(0f32)?.where_cond(&sum_k, &total_all)?;
        // Nucleus: the positions before the share reaches top_p, plus the one that reaches it.
        let top_p = self
            .column(rows.iter().map(|r| r.top_p).collect())?
            .to_dtype(SUMS)?;
        let share = weights_k
            .matmul(&self.triu_candidates)?
            .broadcast_div(&total)?;
        let before = share
            .broadcast_lt(&top_p)?
            .to_dtype(DType::F32)?
            .sum_keepdim(1)?;
        let nucleus = (before + 1.0)?;
        let cut_p = self.column(rows.iter().map(|r| (r.top_p < 1.0) as u8 as f32).collect())?;
        let kept = cut_p
            .ne(0f32)?
            .where_cond(&nucleus.minimum(&k)?, &k)?
            .minimum(c as f64)?;
        // Exact only where the list holds every token at least as likely as the last kept
        // (and, with top-k, as the k-th), with room to spare: its last value is smaller.
        let least = values.narrow(1, c - 1, 1)?;
        let value_at = |count: &Tensor| -> Result<Tensor> {
            let i = (count - 1.0)?
                .clamp(0f64, (c - 1) as f64)?
                .to_dtype(DType::U32)?;
            values.gather(&i, 1)
        };
        let complete = c == self.vocab;
        let mut ok = max.ne(f32::NEG_INFINITY)?;
        if !complete {
            ok = ok
                .mul(&kept.lt(c as f64)?)?
                .mul(&value_at(&kept)?.broadcast_gt(&least)?)?
                .mul(
                    &value_at(&k)?
                        .broadcast_gt(&least)?
                        .maximum(&with_k.eq(0f32)?)?,
                )?;
        }
        // The draw over the kept prefix (positive weights come first: they are sorted).
        let in_kept = positions.broadcast_lt(&kept)?;
        let weights = in_kept.where_cond(&weights, &weights.zeros_like()?)?;
        let kept_total = weights.sum_keepdim(1)?;
        let r = self.target(rows, &kept_total)?;
        let running = weights.matmul(&self.triu_candidates)?;
        let crossed = running
            .broadcast_le(&r)?
            .to_dtype(DType::F32)?
            .sum_keepdim(1)?;
        let positive = weights.gt(0f32)?.to_dtype(DType::F32)?.sum_keepdim(1)?;
        let last = (positive - 1.0)?.clamp(0f64, (c - 1) as f64)?;
        let at = crossed.minimum(&last)?.to_dtype(DType::U32)?;
        let token = ids.gather(&at, 1)?.to_dtype(DType::F32)?;
        decided(&token, &ok)
    }

    /// Each row's best `candidates` scaled logits (largest first, ties in any order) and
    /// their ids: the best of each sort block, then the best of those.
    fn best(&self, scaled: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = scaled.dim(0)?;
        let (s, b, c) = (self.sort_block, self.sort_blocks, self.candidates);
        let padded = s * b;
        let scaled = if padded > self.vocab {
            let pad = Tensor::full(f32::NEG_INFINITY, (n, padded - self.vocab), &self.device)?;
            Tensor::cat(&[scaled, &pad], 1)?
        } else {
            scaled.clone()
        };
        let blocks = scaled.reshape((n * b, s))?;
        let order = blocks
            .arg_sort_last_dim(false)?
            .narrow(1, 0, c)?
            .contiguous()?;
        let values = blocks.gather(&order, 1)?;
        let base = Tensor::arange(0u32, b as u32, &self.device)?
            .affine(s as f64, 0.0)?
            .repeat(n)?
            .reshape((n * b, 1))?;
        let ids = order.broadcast_add(&base)?;
        if b == 1 {
            return Ok((values, ids));
        }
        let values = values.reshape((n, b * c))?;
        let ids = ids.reshape((n, b * c))?;
        let order = values
            .arg_sort_last_dim(false)?
            .narrow(1, 0, c)?
            .contiguous()?;
        Ok((values.gather(&order, 1)?, ids.gather(&order, 1)?))
    }

    /// The candidates reordered canonically: larger value first, ties to the lower id (each
    /// one's place is the number of candidates that go before it).
    fn canonical_order(&self, values: &Tensor, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, c) = values.dims2()?;
        let mine = values.reshape((n, c, 1))?;
        let theirs = values.reshape((n, 1, c))?;
        let ids_f = ids.to_dtype(DType::F32)?;
        let lower_id = ids_f
            .reshape((n, 1, c))?
            .broadcast_lt(&ids_f.reshape((n, c, 1))?)?;
        let before = theirs
            .broadcast_gt(&mine)?
            .maximum(&theirs.broadcast_eq(&mine)?.mul(&lower_id)?)?;
        let place = before.to_dtype(DType::F32)?.sum(2)?;
        let order = place.arg_sort_last_dim(true)?;
        Ok((values.gather(&order, 1)?, ids.gather(&order, 1)?))
    }
}

fn pick<'a>(rows: &'a [DeviceRow], which: &[usize]) -> Vec<&'a DeviceRow> {
    which.iter().map(|&i| &rows[i]).collect()
}

/// `(n, 1)` tokens (as exact f32) where `ok` (u8, `(n, 1)`) holds, read back in one copy.
fn decided(token: &Tensor, ok: &Tensor) -> Result<Vec<Option<u32>>> {
    let flagged = ok.where_cond(token, &Tensor::full(-1f32, token.shape(), token.device())?)?;
    Ok(flagged
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|t| (t >= 0.0).then_some(t as u32))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::Sampler;
    use super::*;
    use crate::request::SamplingConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Rows of logits of every kind the sampler meets: peaked, flat, tied, with impossible
    /// tokens (`-inf`, NaN, `+inf`), and without any possible token.
    fn rows(vocab: usize) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(vocab as u64);
        let mut normal = |scale: f32| -> Vec<f32> {
            (0..vocab)
                .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * scale)
                .collect()
        };
        let peaked = normal(6.0);
        let wide = normal(1.0);
        let tied: Vec<f32> = normal(4.0)
            .iter()
            .map(|x| (x * 2.0).round() / 2.0)
            .collect();
        let mut holes = normal(3.0);
        for (i, x) in holes.iter_mut().enumerate() {
            match i % 7 {
                0 => *x = f32::NEG_INFINITY,
                3 => *x = f32::NAN,
                _ => {}
            }
        }
        let mut infinite = normal(2.0);
        infinite[vocab / 2] = f32::INFINITY;
        vec![
            peaked,
            wide,
            tied,
            holes,
            infinite,
            vec![0.0; vocab],
            vec![f32::NEG_INFINITY; vocab],
        ]
    }

    fn configs(vocab: usize) -> Vec<SamplingConfig> {
        let mut out = Vec::new();
        for temperature in [0.0, 0.7, 1.3] {
            for top_k in [0, 1, 3, 40, 255, 300, vocab] {
                for top_p in [1.0, 0.95, 0.5, 0.0] {
                    out.push(SamplingConfig {
                        temperature,
                        top_k,
                        top_p,
                        ..Default::default()
                    });
                }
            }
        }
        for (repetition_penalty, frequency_penalty, presence_penalty) in
            [(1.3, 0.0, 0.0), (1.0, 0.4, 0.0), (0.8, 0.3, 0.5)]
        {
            for temperature in [0.0, 1.0] {
                out.push(SamplingConfig {
                    temperature,
                    top_p: 0.9,
                    repetition_penalty,
                    frequency_penalty,
                    presence_penalty,
                    ..Default::default()
                });
            }
        }
        out
    }

    /// The device's token for every row it decides is the host sampler's, given the same
    /// uniform; a row it hands back is finished by the host with that uniform. Returns how
    /// many rows the device decided, of how many.
    fn check(vocab: usize) -> (usize, usize) {
        let device = Device::Cpu;
        let sampler = DeviceSampler::new(vocab, &device).unwrap();
        let logits = rows(vocab);
        let (mut decided, mut all) = (0, 0);
        for (c, config) in configs(vocab).into_iter().enumerate() {
            let mut host = Vec::new();
            let mut on_device = Vec::new();
            let mut batch = Vec::new();
            for (r, row) in logits.iter().enumerate() {
                for seed in 0..3u64 {
                    let config = SamplingConfig {
                        seed: seed * 1000 + (c * 10 + r) as u64,
                        ..config
                    };
                    let prompt = [5u32, 9, 9, (vocab - 1) as u32];
                    let mut a = Sampler::new(config, &prompt);
                    let mut b = Sampler::new(config, &prompt);
                    for t in [9u32, 2, 2, 7] {
                        a.observe(t);
                        b.observe(t);
                    }
                    host.push(a.sample(&mut row.clone()));
                    batch.push(b.device_row());
                    on_device.push((b, row));
                }
            }
            let flat: Vec<f32> = on_device
                .iter()
                .flat_map(|(_, r)| r.iter().copied())
                .collect();
            let t = Tensor::from_vec(flat, (batch.len(), vocab), &device).unwrap();
            let picked = sampler.sample(&t, &batch).unwrap();
            for (i, (picked, (mut b, row))) in picked.into_iter().zip(on_device).enumerate() {
                all += 1;
                let token = match picked {
                    Some(t) => {
                        decided += 1;
                        t
                    }
                    None => b.sample(&mut row.clone()),
                };
                assert_eq!(
                    token,
                    host[i],
                    "vocab {vocab}, {:?}, row {}, decided on the device: {}",
                    batch[i],
                    i / 3,
                    picked.is_some()
                );
            }
        }
        (decided, all)
    }

    #[test]
    fn device_sampling_is_the_host_sampler() {
        // One sort block holding the whole vocabulary (every token a candidate), one block
        // with more tokens than candidates, and several blocks with padding.
        for vocab in [200, 1000, 9000] {
            let (decided, all) = check(vocab);
            // Handed back: top-k above the list, nuclei wider than it (these random rows are
            // far flatter than a model's), cuts inside ties, rows of nothing.
            assert!(decided * 10 >= all * 6, "vocab {vocab}: {decided} of {all}");
        }
    }

    /// The log-probabilities computed here are the host's for every row the device keeps
    /// (ids and order exactly, values to f32 rounding), and every row of the kinds it must
    /// hand back is handed back.
    #[test]
    fn device_logprobs_are_the_hosts() {
        for vocab in [200, 1000, 9000] {
            let sampler = DeviceSampler::new(vocab, &Device::Cpu).unwrap();
            let logits = rows(vocab);
            let mut kept = 0;
            for top in [0, 1, 5, 20, 256, 300] {
                let n = logits.len();
                let flat: Vec<f32> = logits.iter().flatten().copied().collect();
                let t = Tensor::from_vec(flat, (n, vocab), &Device::Cpu).unwrap();
                let chosen: Vec<u32> = (0..n as u32).map(|i| (i * 37) % vocab as u32).collect();
                let tops = vec![top; n];
                let got = sampler.logprobs(&t, &chosen, &tops).unwrap();
                for (r, got) in got.into_iter().enumerate() {
                    let host = super::super::step_logprobs(&logits[r], chosen[r], top);
                    let Some(got) = got else {
                        // Only what the list cannot prove (a top as long as the list or
                        // longer, ties at its end) or rows with nothing finite.
                        let no_finite = logits[r].iter().all(|l| !l.is_finite());
                        assert!(
                            top >= sampler.candidates() || no_finite || r == 2 || r == 5,
                            "vocab {vocab}, row {r}, top {top} handed back"
                        );
                        continue;
                    };
                    kept += 1;
                    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
                    let what = format!("vocab {vocab}, row {r}, top {top}");
                    assert_eq!(got.chosen.0, host.chosen.0, "{what}");
                    assert!(
                        close(got.chosen.1, host.chosen.1),
                        "{what}: {got:?} {host:?}"
                    );
                    let ids = |s: &super::super::StepLogprobs| -> Vec<u32> {
                        s.top.iter().map(|t| t.0).collect()
                    };
                    assert_eq!(ids(&got), ids(&host), "{what}");
                    for (g, h) in got.top.iter().zip(&host.top) {
                        assert!(close(g.1, h.1), "{what}: {g:?} {h:?}");
                    }
                }
            }
            assert!(kept >= 20, "vocab {vocab}: only {kept} rows kept");
        }
        // Distinct values: a top of 20 is decided here, ties of the flat row are not.
        let sampler = DeviceSampler::new(1000, &Device::Cpu).unwrap();
        let mut rows = (0..1000).map(|i| -(i as f32) * 0.01).collect::<Vec<_>>();
        rows.extend(vec![0f32; 1000]);
        let t = Tensor::from_vec(rows, (2, 1000), &Device::Cpu).unwrap();
        let got = sampler.logprobs(&t, &[3, 3], &[20, 20]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().top.len(), 20);
        assert_eq!(got[0].as_ref().unwrap().top[0].0, 0);
        assert!(got[1].is_none());
        // Without a top list even the flat row is the device's.
        let got = sampler.logprobs(&t, &[3, 3], &[0, 0]).unwrap();
        let flat = got[1].as_ref().unwrap();
        assert!((flat.chosen.1 - -(1000f32).ln()).abs() < 1e-5);
    }

    #[test]
    fn what_the_list_cannot_decide_goes_back_to_the_host() {
        let vocab = 1000;
        let sampler = DeviceSampler::new(vocab, &Device::Cpu).unwrap();
        assert_eq!(sampler.candidates(), 256);
        let row = |top_k, top_p| DeviceRow {
            temperature: 1.0,
            top_k,
            top_p,
            u: 0.5,
            penalties: vec![],
            top_logprobs: None,
        };
        let flat = Tensor::zeros((4, vocab), DType::F32, &Device::Cpu).unwrap();
        let got = sampler
            .sample(
                &flat,
                &[row(300, 1.0), row(0, 0.5), row(10, 1.0), row(0, 1.0)],
            )
            .unwrap();
        // Over 1000 tied tokens: a top-k over the list; a nucleus of 500; 10 of them (which
        // 10 the list cannot tell); the whole vocabulary (the middle one).
        assert_eq!(got, [None, None, None, Some(500)]);
        // Distinct values: the 10 best are in the list, and the draw is the host's.
        let falling: Vec<f32> = (0..vocab).map(|i| -(i as f32) * 0.01).collect();
        let t = Tensor::from_vec(falling, (1, vocab), &Device::Cpu).unwrap();
        assert_eq!(sampler.sample(&t, &[row(10, 1.0)]).unwrap(), [Some(4)]);
    }
}
