//! Attention over the paged KV pool on the CPU, one query row at a time, in a fixed order of
//! float operations.
//!
//! **Why a kernel of its own.** Composed of candle's ops (a batched matmul, a masked softmax,
//! a second matmul), a query row's result depends on the shape it was computed in: the number
//! of rows beside it (a prompt chunk's length, the decode batch) picks the matmul's path, and
//! the masked tail of a chunk or the padding of a batch changes the length of its sums. Keys
//! and values are computed from those results, so the same token's cache entry differed by a
//! few bits between a prompt chunk of 32 and one token at a time while generating, and a
//! conversation's next turn that reused the answer's cached blocks drifted from a cold node's
//! (`tests/engine/paged.rs`). Here the row at position `p` is a function of its query and the
//! keys and values at positions `0..=p` alone, computed the same way whether it is one of a
//! chunk, a decode batch or alone: prefix caching is exact on the CPU, and so is batching.
//!
//! **Order of operations**, per query row and head (`hd` = head size): scores `s_j = dot(q,
//! k_j) * scale` for `j = 0..=p` (a dot product keeps 8 partial sums over `hd`, lane `l` taking
//! elements `l, l + 8, ...` by fused multiply-adds, added pairwise at the end); `m = max s_j`
//! and `sum = sum_j e_j` in 8 lanes the same way; `e_j = exp(s_j - m)` by a polynomial of
//! fused multiply-adds (`exp_nonpositive`, within 2 ulp; a libm call would neither vectorise
//! nor promise the same bits everywhere); `out = (sum_j e_j v_j) / sum`, accumulated by fused
//! multiply-adds in order of `j` for every element of `v` at once. Every step is an exactly
//! rounded IEEE operation and Rust fuses nothing it is not asked to, so vectorised and scalar
//! forms of these loops (AVX2 intrinsics for the dot products where the build has them, plain
//! code elsewhere) give the same bits on every instruction set.
//!
//! **Blocks.** Up to 16 consecutive rows of one sequence (a prompt chunk) are computed
//! together: each key and value is read once for all of them, where row by row a long history
//! would be read from memory once per row. Each row still gets exactly its own operations in
//! its own order. Blocks and heads run in parallel on the kernels' pool; each writes its own
//! rows.

use super::cpu;
use std::cell::RefCell;

/// Consecutive query rows of one sequence: row `k` (`0..rows`, step row `row0 + k`) attends
/// over the pool rows `slots[..first_len + k]` (a prompt chunk: `first_len` is the first new
/// token's position + 1; a decoding token: one row).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span<'a> {
    pub slots: &'a [u32],
    pub first_len: usize,
    pub rows: usize,
    pub row0: usize,
}

/// Shapes of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple).
    pub n_kv: usize,
    /// Values per head.
    pub hd: usize,
    pub scale: f32,
}

/// Rows of one span computed together: each key and value is read once for all of them (each
/// row still gets exactly the operations it would get alone).
const BLOCK_ROWS: usize = 16;

/// Attends every query row over its history. `q`: `(n_head, total, hd)`; `k_pool`, `v_pool`:
/// `(slots, n_kv * hd)`; `spans` cover the `total` rows. Returns `(total, n_head * hd)`.
pub(crate) fn paged_attention(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    spans: &[Span<'_>],
    total: usize,
    heads: Heads,
) -> Vec<f32> {
    let Heads {
        n_head, n_kv, hd, ..
    } = heads;
    assert_eq!(q.len(), n_head * total * hd, "q is (n_head, total, hd)");
    assert!(n_kv > 0 && n_head % n_kv == 0, "query heads per kv head");
    let width = n_kv * hd;
    let slots = k_pool.len() / width.max(1);
    assert_eq!(k_pool.len(), v_pool.len());
    let mut covered = 0;
    // Work items: (span, first row in it, rows) blocks, times heads.
    let mut blocks = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        assert!(
            span.first_len >= 1,
            "a query row attends over at least itself"
        );
        assert!(span.first_len + span.rows - 1 <= span.slots.len());
        assert!(span.row0 + span.rows <= total);
        assert!(
            span.slots[..span.first_len + span.rows - 1]
                .iter()
                .all(|&s| (s as usize) < slots),
            "a history row outside the pool"
        );
        covered += span.rows;
        for b in (0..span.rows).step_by(BLOCK_ROWS) {
            blocks.push((i, b, BLOCK_ROWS.min(span.rows - b)));
        }
    }
    assert_eq!(covered, total, "the spans cover every row once");
    let mut out = vec![0f32; total * n_head * hd];
    let out_addr = out.as_mut_ptr() as usize;
    let groups = n_head / n_kv;
    cpu::parallel_chunks(blocks.len() * n_head, |items| {
        for item in items {
            let ((s, b, n), h) = (blocks[item / n_head], item % n_head);
            let span = spans[s];
            let r0 = span.row0 + b;
            let q_rows = &q[(h * total + r0) * hd..][..n * hd];
            let first_len = span.first_len + b;
            let kernel = match hd {
                64 => block_fixed::<64>,
                128 => block_fixed::<128>,
                _ => block,
            };
            kernel(
                q_rows,
                k_pool,
                v_pool,
                span.slots,
                first_len,
                n,
                h / groups,
                width,
                heads,
                &mut |i, o| {
                    // SAFETY: every item writes only its own rows' `hd` values of head `h`, and
                    // `out` outlives the call (`parallel_chunks` returns once every item is done).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_addr as *mut f32).add(((r0 + i) * n_head + h) * hd),
                            hd,
                        )
                    };
                    dst.copy_from_slice(o);
                },
            );
        }
    });
    out
}

thread_local! {
    /// Per thread: scores of the rows being computed, and their outputs.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `n` consecutive query rows of one head (`q`: `n` rows of `hd`), row `i` attending over
/// `slots[..first_len + i]`; hands each row's output to `emit`. The operations on a row are
/// those of the module docs, in the same order whatever `n` is.
#[allow(clippy::too_many_arguments)]
fn block(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    slots: &[u32],
    first_len: usize,
    n: usize,
    kv_head: usize,
    width: usize,
    heads: Heads,
    emit: &mut dyn FnMut(usize, &[f32]),
) {
    let hd = heads.hd;
    let at = |slot: u32| slot as usize * width + kv_head * hd;
    let last_len = first_len + n - 1;
    let len = |i: usize| first_len + i;
    SCRATCH.with(|scratch| {
        let (scores, acc) = &mut *scratch.borrow_mut();
        scores.clear();
        scores.resize(n * last_len, 0.0);
        // Scores, position by position: each key is read once for every row that sees it.
        for (j, &slot) in slots[..last_len].iter().enumerate() {
            let k = &k_pool[at(slot)..][..hd];
            let from = j.saturating_sub(first_len - 1); // rows `from..n` see position j
            for i in from..n {
                scores[i * last_len + j] = dot(&q[i * hd..][..hd], k) * heads.scale;
            }
        }
        // Softmax weights per row (unnormalised), and their sums.
        let mut sums = [0f32; BLOCK_ROWS];
        for i in 0..n {
            let row = &mut scores[i * last_len..][..len(i)];
            sums[i] = softmax_weights(row);
        }
        // Values, position by position, each read once: out_i += e_ij * v_j for j in order.
        acc.clear();
        acc.resize(n * hd, 0.0);
        for (j, &slot) in slots[..last_len].iter().enumerate() {
            let v = &v_pool[at(slot)..][..hd];
            let from = j.saturating_sub(first_len - 1);
            for i in from..n {
                let e = scores[i * last_len + j];
                for (o, &x) in acc[i * hd..][..hd].iter_mut().zip(v) {
                    *o = e.mul_add(x, *o);
                }
            }
        }
        for (i, sum) in sums.iter().enumerate().take(n) {
            let inv = 1.0 / sum;
            let o = &mut acc[i * hd..][..hd];
            for x in o.iter_mut() {
                *x *= inv;
            }
            emit(i, o);
        }
    })
}

/// Positions per tile of [`block_fixed`]: a tile's keys (or values) stay in L1 while every row
/// of the block reads them (64 positions x 64 values x 4 bytes = 16 KiB).
const TILE: usize = 64;

/// [`block`] for a head size known when compiling: the same operations on every row in the
/// same order (so the same bits), with a row's query and output held in registers over a tile
/// of positions and the tile's keys and values in L1 over the rows.
#[allow(clippy::too_many_arguments)]
fn block_fixed<const HD: usize>(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    slots: &[u32],
    first_len: usize,
    n: usize,
    kv_head: usize,
    width: usize,
    heads: Heads,
    emit: &mut dyn FnMut(usize, &[f32]),
) {
    debug_assert_eq!(heads.hd, HD);
    let at = |slot: u32| slot as usize * width + kv_head * HD;
    let last_len = first_len + n - 1;
    SCRATCH.with(|scratch| {
        let (scores, acc) = &mut *scratch.borrow_mut();
        scores.clear();
        scores.resize(n * last_len, 0.0);
        for t0 in (0..last_len).step_by(TILE) {
            let t1 = (t0 + TILE).min(last_len);
            for i in 0..n {
                let end = t1.min(first_len + i);
                if end <= t0 {
                    continue;
                }
                let qi: &[f32; HD] = q[i * HD..][..HD].try_into().expect("HD values");
                let out = &mut scores[i * last_len + t0..i * last_len + end];
                let mut j = t0;
                for four in out.chunks_mut(4) {
                    if four.len() == 4 {
                        let k = |o: usize| -> &[f32; HD] {
                            k_pool[at(slots[j + o])..][..HD].try_into().expect("HD")
                        };
                        let d = dot4::<HD>(qi, [k(0), k(1), k(2), k(3)]);
                        for (s, d) in four.iter_mut().zip(d) {
                            *s = d * heads.scale;
                        }
                    } else {
                        for (o, s) in four.iter_mut().enumerate() {
                            *s = dot(qi, &k_pool[at(slots[j + o])..][..HD]) * heads.scale;
                        }
                    }
                    j += four.len();
                }
            }
        }
        let mut sums = [0f32; BLOCK_ROWS];
        for i in 0..n {
            let r = &mut scores[i * last_len..][..first_len + i];
            sums[i] = softmax_weights(r);
        }
        acc.clear();
        acc.resize(n * HD, 0.0);
        for t0 in (0..last_len).step_by(TILE) {
            let t1 = (t0 + TILE).min(last_len);
            for i in 0..n {
                let end = t1.min(first_len + i);
                if end <= t0 {
                    continue;
                }
                let mut o: [f32; HD] = acc[i * HD..][..HD].try_into().expect("HD values");
                for j in t0..end {
                    let e = scores[i * last_len + j];
                    let v: &[f32; HD] = v_pool[at(slots[j])..][..HD].try_into().expect("HD");
                    for d in 0..HD {
                        o[d] = e.mul_add(v[d], o[d]);
                    }
                }
                acc[i * HD..][..HD].copy_from_slice(&o);
            }
        }
        for (i, sum) in sums.iter().enumerate().take(n) {
            let inv = 1.0 / sum;
            let o = &mut acc[i * HD..][..HD];
            for x in o.iter_mut() {
                *x *= inv;
            }
            emit(i, o);
        }
    })
}

/// Turns scores into unnormalised softmax weights, `e_j = exp(s_j - max)`, and returns their
/// sum. The maximum and the sum keep 8 partial results (lane `l` takes `j = l, l + 8, ...`),
/// combined pairwise like [`dot`]'s; the exponential is [`exp_nonpositive`]. Every step is an
/// exactly rounded IEEE operation in a fixed order, so vectorised or not, the bits are the
/// same.
fn softmax_weights(scores: &mut [f32]) -> f32 {
    let lanes = |xs: &[f32], start: f32, f: fn(f32, f32) -> f32| -> [f32; 8] {
        let mut acc = [start; 8];
        let chunks = xs.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                acc[l] = f(acc[l], c[l]);
            }
        }
        for (l, &x) in rest.iter().enumerate() {
            acc[l] = f(acc[l], x);
        }
        acc
    };
    let pairwise = |a: [f32; 8], f: fn(f32, f32) -> f32| {
        f(
            f(f(a[0], a[4]), f(a[1], a[5])),
            f(f(a[2], a[6]), f(a[3], a[7])),
        )
    };
    let max = pairwise(lanes(scores, f32::NEG_INFINITY, f32::max), f32::max);
    for s in scores.iter_mut() {
        *s = exp_nonpositive(*s - max);
    }
    pairwise(lanes(scores, 0.0, |a, b| a + b), |a, b| a + b)
}

/// `e^x` for `x <= 0` (and 0 below about -87.3, where `e^x` is under f32's smallest normal),
/// within 2 ulp: `x = n ln 2 + r` (`|r| <= ln 2 / 2`, `ln 2` split in two for an exact
/// reduction), a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients), times `2^n` put
/// in the exponent bits. Only fused multiply-adds, products, sums and a rounding to an
/// integer, so the compiler vectorises it and every instruction set gets the same bits (a libm
/// call is neither).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x < -87.336_55 {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n from n's bits: n + 1.5·2^23 holds n (-126..=0 here) in its low mantissa bits. Not
    // `n as i32`, whose saturating conversion the vectoriser does one lane at a time (it made
    // GELU over an embedding batch's activations 3x slower).
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// [`dot`] of `q` with four keys at once (four independent chains of fused multiply-adds, so
/// the processor overlaps them): each result is exactly [`dot`]'s.
#[inline(always)]
fn dot4<const HD: usize>(q: &[f32; HD], k: [&[f32; HD]; 4]) -> [f32; 4] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if HD.is_multiple_of(8) {
        // SAFETY: the build requires AVX2 and FMA (checked at start-up), and every load is
        // within `q` or a key (HD values each, HD a multiple of 8).
        return unsafe { avx2::dot4(q, k) };
    }
    k.map(|k| dot(q, k))
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lane `l` of a 256-bit accumulator takes elements `l, l + 8, ...` by fused multiply-adds,
    /// then `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`: [`super::dot`]'s operations.
    #[inline(always)]
    pub(super) unsafe fn dot4<const HD: usize>(q: &[f32; HD], k: [&[f32; HD]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in 0..HD / 8 {
            let qc = _mm256_loadu_ps(q.as_ptr().add(c * 8));
            for (a, k) in acc.iter_mut().zip(k) {
                *a = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k.as_ptr().add(c * 8)), *a);
            }
        }
        acc.map(|a| {
            // (a0 + a4, a1 + a5, a2 + a6, a3 + a7)
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            // (s0 + s1, _, s2 + s3, _)
            let t = _mm_add_ps(s, _mm_movehdup_ps(s));
            // (s0 + s1) + (s2 + s3)
            _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)))
        })
    }
}

/// `sum a_i b_i` with 8 partial sums (lane `l` takes `i = l, l + 8, ...`, fused
/// multiply-adds), added pairwise.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] = x.mul_add(*y, acc[l]);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random f32 in [-1, 1).
    fn noise(i: usize) -> f32 {
        let x = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(17);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn pool(slots: usize, width: usize, seed: usize) -> Vec<f32> {
        (0..slots * width).map(|i| noise(i * 7 + seed)).collect()
    }

    /// Exact attention in f64: the reference.
    fn reference(q: &[f32], k: &[f32], v: &[f32], histories: &[&[u32]], heads: Heads) -> Vec<f64> {
        let rows = histories.len();
        let (hd, groups) = (heads.hd, heads.n_head / heads.n_kv);
        let width = heads.n_kv * hd;
        let mut out = vec![0f64; rows * heads.n_head * hd];
        for r in 0..rows {
            for h in 0..heads.n_head {
                let kvh = h / groups;
                let qr = &q[(h * rows + r) * hd..][..hd];
                let s: Vec<f64> = histories[r]
                    .iter()
                    .map(|&j| {
                        let kr = &k[j as usize * width + kvh * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * heads.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (w, &j) in e.iter().zip(histories[r]) {
                    let vr = &v[j as usize * width + kvh * hd..][..hd];
                    for d in 0..hd {
                        out[(r * heads.n_head + h) * hd + d] += w / sum * vr[d] as f64;
                    }
                }
            }
        }
        out
    }

    const HEADS: Heads = Heads {
        n_head: 6,
        n_kv: 2,
        hd: 20, // not a multiple of 8: the remainder path too
        scale: 0.2236,
    };

    /// Every row alone (a span of one row each): per-row histories.
    fn alone(histories: &[&[u32]]) -> Vec<Span<'static>> {
        histories
            .iter()
            .enumerate()
            .map(|(r, h)| Span {
                // The tests' histories live as long as the test: leak them for the 'static span.
                slots: Box::leak(h.to_vec().into_boxed_slice()),
                first_len: h.len(),
                rows: 1,
                row0: r,
            })
            .collect()
    }

    #[test]
    fn it_is_attention() {
        let width = HEADS.n_kv * HEADS.hd;
        let (k, v) = (pool(64, width, 1), pool(64, width, 2));
        // Histories as a paged cache has them: blocks scattered over the pool.
        let table: Vec<u32> = [40u32, 8, 56, 0].iter().flat_map(|b| *b..b + 8).collect();
        // A chunk of 20 rows (more than a block) at positions 8..28, and two rows alone.
        let rows = 22;
        let mut histories: Vec<&[u32]> = (0..20).map(|r| &table[..9 + r]).collect();
        histories.push(&table[..3]);
        histories.push(&table[..32]);
        let q: Vec<f32> = (0..HEADS.n_head * rows * HEADS.hd)
            .map(|i| noise(i + 99) * 3.0)
            .collect();
        let want = reference(&q, &k, &v, &histories, HEADS);
        let mut chunked = vec![Span {
            slots: &table,
            first_len: 9,
            rows: 20,
            row0: 0,
        }];
        chunked.extend(alone(&[&table[..3], &table[..32]]));
        chunked[1].row0 = 20;
        chunked[2].row0 = 21;
        for spans in [chunked, alone(&histories)] {
            let got = paged_attention(&q, &k, &v, &spans, rows, HEADS);
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} against {w}");
            }
        }
    }

    /// A row's bits depend on its query and history alone: alone, at any place in a chunk,
    /// or in a batch with other sequences' rows.
    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        let width = HEADS.n_kv * HEADS.hd;
        let (k, v) = (pool(128, width, 3), pool(128, width, 4));
        let a: Vec<u32> = (0..60).collect();
        let b: Vec<u32> = (64..128).rev().collect();
        // Query of the row at position `p` of sequence `a`, head `h`.
        let q_of = |p: usize, h: usize| -> Vec<f32> {
            (0..HEADS.hd)
                .map(|d| noise(p * 1000 + h * 100 + d))
                .collect()
        };
        // Runs spans of `a` rows (first position, rows) beside a row of `b`; returns the
        // output of the row at position 29 of `a`.
        let run = |chunks: &[(usize, usize)]| -> Vec<u32> {
            let total: usize = chunks.iter().map(|c| c.1).sum::<usize>() + 1;
            let mut q = vec![0f32; HEADS.n_head * total * HEADS.hd];
            let mut spans = Vec::new();
            let mut row = 0;
            let mut at = None;
            for &(first, n) in chunks {
                for i in 0..n {
                    for h in 0..HEADS.n_head {
                        q[(h * total + row + i) * HEADS.hd..][..HEADS.hd]
                            .copy_from_slice(&q_of(first + i, h));
                    }
                    if first + i == 29 {
                        at = Some(row + i);
                    }
                }
                spans.push(Span {
                    slots: &a,
                    first_len: first + 1,
                    rows: n,
                    row0: row,
                });
                row += n;
            }
            for h in 0..HEADS.n_head {
                q[(h * total + row) * HEADS.hd..][..HEADS.hd].copy_from_slice(&q_of(77, h));
            }
            spans.push(Span {
                slots: &b,
                first_len: 50,
                rows: 1,
                row0: row,
            });
            let out = paged_attention(&q, &k, &v, &spans, total, HEADS);
            let r = at.expect("position 29 is in a chunk");
            out[r * HEADS.n_head * HEADS.hd..][..HEADS.n_head * HEADS.hd]
                .iter()
                .map(|f| f.to_bits())
                .collect()
        };
        let alone = run(&[(29, 1)]);
        for chunks in [
            &[(0, 30)][..],
            &[(20, 40)],
            &[(13, 17), (30, 5)],
            &[(28, 2), (45, 3)],
            &[(29, 16)],
            &[(14, 16)],
            &[(10, 33)],
        ] {
            assert_eq!(run(chunks), alone, "{chunks:?}");
        }
    }

    #[test]
    fn the_exponential_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.3f32 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // 2 ulp of f32 is 2.4e-7 relative; allow for the subnormal-free tail.
        assert!(worst < 2.4e-7, "relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn four_dot_products_at_once_are_four_dot_products() {
        let q: [f32; 64] = std::array::from_fn(|i| noise(i) * 3.0);
        let ks: Vec<[f32; 64]> = (0..4)
            .map(|r| std::array::from_fn(|i| noise(i + 64 * (r + 1)) * 5.0))
            .collect();
        let got = dot4(&q, [&ks[0], &ks[1], &ks[2], &ks[3]]);
        for (g, k) in got.iter().zip(&ks) {
            assert_eq!(g.to_bits(), dot(&q, k).to_bits());
        }
    }

    /// The kernels for head sizes known when compiling give the generic kernel's bits.
    #[test]
    fn fixed_head_sizes_are_the_generic_kernel() {
        for hd in [64, 128] {
            let heads = Heads {
                n_head: 4,
                n_kv: 2,
                hd,
                scale: 0.125,
            };
            let width = heads.n_kv * hd;
            let (k, v) = (pool(200, width, 6), pool(200, width, 7));
            let slots: Vec<u32> = (0..200).rev().collect();
            let q: Vec<f32> = (0..16 * hd).map(|i| noise(i + 3) * 2.0).collect();
            for (first_len, n) in [(1, 1), (70, 16), (130, 9), (190, 1)] {
                let run = |generic: bool| {
                    let mut out = vec![];
                    let kernel = match (generic, hd) {
                        (true, _) => block,
                        (false, 64) => block_fixed::<64>,
                        _ => block_fixed::<128>,
                    };
                    kernel(
                        &q[..n * hd],
                        &k,
                        &v,
                        &slots,
                        first_len,
                        n,
                        1,
                        width,
                        heads,
                        &mut |_, o| out.extend(o.iter().map(|x| x.to_bits())),
                    );
                    out
                };
                assert_eq!(run(false), run(true), "hd {hd}, {first_len} + {n} rows");
            }
        }
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let width = HEADS.n_kv * HEADS.hd;
        let k: Vec<f32> = (0..8 * width).map(|i| noise(i) * 200.0).collect();
        let v = pool(8, width, 5);
        let hist: Vec<u32> = (0..8).collect();
        let q: Vec<f32> = (0..HEADS.n_head * HEADS.hd)
            .map(|i| noise(i + 5) * 200.0)
            .collect();
        let out = paged_attention(&q, &k, &v, &alone(&[&hist]), 1, HEADS);
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
