//! Q6_K weights repacked into 16-row tiles, x Q8_K activations: [`super::q4_k_tiled`]'s
//! design for the other half of a `Q4_K_M` file (`attn_v` / `ffn_down` in a third of the
//! layers, and the output matrix).
//!
//! # Why
//!
//! With the Q4_K matrices tiled, the in-place Q6_K kernel ([`super::q6_k`]; 32 values of one
//! row per vector) took a fifth of a 522-token prefill of Llama-3-mini for a seventh of its
//! products. Here a vector holds 4 values of each of 8 (or 16) weight rows, as in the Q4_K
//! tiles.
//!
//! # Layout (one [`TileQ6K`] = 16 weight rows x one 256-value super-block, 3360 bytes: the
//! file's 16 x 210, repacked)
//!
//! * `d`: the 16 rows' f16 scales;
//! * `sc[p][r]`: row `r`'s scales of 16-value sub-blocks `2p` and `2p + 1` (i8);
//! * `ql[s][g][r][j]` = low 4 bits of `q[32s + 8g + j]` | those of `q[32s + 8g + j + 4]` << 4;
//! * `qh[s / 2][g][r][j]`: the top 2 bits of the same four values of `s = 2 (s / 2)` (bits
//!   0-1, 2-3) and of `s = 2 (s / 2) + 1` (bits 4-5, 6-7).
//!
//! The tiles replace the file's blocks (candle's tensor is dropped): no second copy. A shared
//! (tied) Q6_K matrix, or one whose rows are not a multiple of 16, stays in place.
//!
//! # Numerics (per output, whatever the batch, the ISA or the vector width)
//!
//! Per super-block: `isum_t = Σ q x` over 16-value sub-block `t` (exact i32, `q` in 0..64),
//! `sumi = Σ_t sc[t] isum_t - 32 Σ_t sc[t] Σ x_t` (exact; the `-32` offset of the quants from
//! the activations' per-16 sums), then `acc = fma(f32(sumi), d_w * d_x, acc)`. The output is
//! `acc`; every float operation is per lane, in this order, so every path gives the same bits.

use super::cpu::f16_to_f32;
use super::q8_k::Q8KBlock;
use super::{cpu, forward_cpu, Activations, CpuMatrix, Ctx, TiledMatrix, QK_K, TILE_ROWS};
use candle_core::quantized::k_quants::BlockQ6K as CandleQ6K;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

/// 16 weight rows x one super-block of Q6_K, repacked (see the module docs).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct TileQ6K {
    /// f16 bits, per row.
    d: [u16; TILE_ROWS],
    /// `sc[p][r]`: row `r`'s scales of sub-blocks `2p`, `2p + 1`.
    sc: [[[i8; 2]; TILE_ROWS]; 8],
    /// `ql[s][g][r][j]`, two low nibbles per byte.
    ql: [[[[u8; 4]; TILE_ROWS]; 4]; 8],
    /// `qh[s / 2][g][r][j]`, four top-2-bit fields per byte.
    qh: [[[[u8; 4]; TILE_ROWS]; 4]; 4],
}
const _: () = assert!(std::mem::size_of::<TileQ6K>() == 16 * 210);

/// GGML's Q6_K super-block (candle's `BlockQ6K`), read while packing.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ6K {
    ql: [u8; QK_K / 2],
    qh: [u8; QK_K / 4],
    scales: [i8; QK_K / 16],
    d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == std::mem::size_of::<CandleQ6K>());

impl BlockQ6K {
    /// Value `l`'s 6-bit quant (0..64), as GGML's `dequantize_row_q6_K` reads it.
    fn q(&self, l: usize) -> u8 {
        let (half, l) = (l / 128, l % 128);
        let (quarter, l) = (l / 32, l % 32);
        let ql = self.ql[64 * half + l + 32 * (quarter % 2)];
        let low = if quarter < 2 { ql & 0xf } else { ql >> 4 };
        let high = (self.qh[32 * half + l] >> (2 * quarter)) & 3;
        low | high << 4
    }
}

/// A Q6_K weight matrix (n rows of k values, `n % 16 == 0`, `k % 256 == 0`) repacked into
/// tiles.
pub type Q6KTiled = TiledMatrix<TileQ6K>;

impl Q6KTiled {
    /// `Some(..)` when `t` is a 2-D Q6_K tensor on the CPU with a multiple of 16 rows of a
    /// multiple of 256 values; `None` otherwise. The caller drops `t` afterwards.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        Self::repack(t, GgmlDType::Q6K, pack)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// One tile from its 16 rows' blocks (see the module docs for the layout).
fn pack(rows: &[BlockQ6K; TILE_ROWS]) -> TileQ6K {
    let mut tile = TileQ6K {
        d: [0; TILE_ROWS],
        sc: [[[0; 2]; TILE_ROWS]; 8],
        ql: [[[[0; 4]; TILE_ROWS]; 4]; 8],
        qh: [[[[0; 4]; TILE_ROWS]; 4]; 4],
    };
    for (r, blk) in rows.iter().enumerate() {
        tile.d[r] = blk.d;
        for t in 0..16 {
            tile.sc[t / 2][r][t % 2] = blk.scales[t];
        }
        for s in 0..8 {
            for g in 0..4 {
                for j in 0..4 {
                    let (a, c) = (blk.q(32 * s + 8 * g + j), blk.q(32 * s + 8 * g + j + 4));
                    tile.ql[s][g][r][j] = (a & 0xf) | (c & 0xf) << 4;
                    tile.qh[s / 2][g][r][j] |= ((a >> 4) | (c >> 4) << 2) << (4 * (s % 2));
                }
            }
        }
    }
    tile
}

impl CpuMatrix for Q6KTiled {
    const NAME: &'static str = "Q6KTiled";
    const ACTIVATIONS: Activations = Activations::Q8K;
    const GROUP: usize = TILE_ROWS;

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn blocks_addr(&self) -> usize {
        self.tiles.as_ptr() as usize
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_rows<D: super::cpu::avx2::Dot>(ctx: &Ctx, rows: std::ops::Range<usize>) {
        avx2::rows::<D>(ctx, rows)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        avx512::rows(ctx, rows)
    }

    unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        scalar_rows(ctx, rows)
    }
}

/// Block `b` of lhs row `i` of a [`Ctx`] and its scale.
#[inline(always)]
unsafe fn lhs(ctx: &Ctx, i: usize, b: usize) -> (&Q8KBlock, f32) {
    let x = &*(ctx.qs as *const Q8KBlock).add(i * ctx.nb + b);
    (x, *(ctx.d8 as *const f32).add(b * ctx.m + i))
}

/// Portable kernel: the same integer sums and float operations, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers of this format and `rows` lie within `0..ctx.n`.
unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
    let tiles = ctx.w as *const TileQ6K;
    let out = ctx.out as *mut f32;
    for j in rows {
        let (t, r) = (j / TILE_ROWS, j % TILE_ROWS);
        for i in 0..ctx.m {
            let mut acc = 0f32;
            for b in 0..ctx.nb {
                let tile = &*tiles.add(t * ctx.nb + b);
                let (x, dx) = lhs(ctx, i, b);
                let mut sumi = 0i32;
                for s in 0..8 {
                    for half in 0..2 {
                        let mut isum = 0i32;
                        for g in 2 * half..2 * half + 2 {
                            for jj in 0..4 {
                                let low = tile.ql[s][g][r][jj];
                                let high = tile.qh[s / 2][g][r][jj] >> (4 * (s % 2));
                                let a = (low & 0xf) | (high & 3) << 4;
                                let c = (low >> 4) | ((high >> 2) & 3) << 4;
                                isum += a as i32 * x.qs[32 * s + 8 * g + jj] as i32
                                    + c as i32 * x.qs[32 * s + 8 * g + jj + 4] as i32;
                            }
                        }
                        let sub = 2 * s + half;
                        sumi += tile.sc[sub / 2][r][sub % 2] as i32 * isum;
                    }
                }
                let mut offset = 0i32;
                for sub in 0..16 {
                    offset += tile.sc[sub / 2][r][sub % 2] as i32 * x.bsums[sub] as i32;
                }
                sumi -= offset << 5;
                acc = (sumi as f32).mul_add(f16_to_f32(tile.d[r]) * dx, acc);
            }
            *out.add(i * ctx.n + j) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::Dot;
    use super::{lhs, Ctx, TileQ6K, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Lhs rows per call of the tile kernel.
    const TALL: usize = 4;
    /// Lhs rows whose quants stay in cache while a work item's tiles pass over them.
    const LHS_CHUNK: usize = 64;

    /// Weight rows `rows` (whole tiles) against every lhs row.
    ///
    /// # Safety
    /// Only called inside `CpuMatrix::rows`' entry point for `D`; `ctx` must describe live
    /// buffers of this format and `rows` lie within `0..ctx.n`, starting at a multiple of 16.
    #[inline(always)]
    pub(super) unsafe fn rows<D: Dot>(ctx: &Ctx, rows: std::ops::Range<usize>) {
        for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
            let i1 = ctx.m.min(i0 + LHS_CHUNK);
            for half in (rows.start / 8)..rows.end.div_ceil(8) {
                let mut i = i0;
                while i + TALL <= i1 {
                    half_tile::<D, TALL>(ctx, i, half);
                    i += TALL;
                }
                match i1 - i {
                    0 => {}
                    1 => half_tile::<D, 1>(ctx, i, half),
                    2 => half_tile::<D, 2>(ctx, i, half),
                    _ => half_tile::<D, 3>(ctx, i, half),
                }
            }
        }
    }

    /// 4 bytes at `p`, broadcast.
    #[inline(always)]
    unsafe fn bcast4<T>(p: *const T) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Lhs rows `i..i + R` against weight rows `8 * half..8 * half + 8` (half a tile).
    #[inline(always)]
    unsafe fn half_tile<D: Dot, const R: usize>(ctx: &Ctx, i: usize, half: usize) {
        let nb = ctx.nb;
        let (t, h) = (half / 2, half % 2);
        let tiles = (ctx.w as *const TileQ6K).add(t * nb);
        let low4 = _mm256_set1_epi8(0x0f);
        let top2 = _mm256_set1_epi8(0x30);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let tile = &*tiles.add(b);
            let x: [&super::Q8KBlock; R] = std::array::from_fn(|r| lhs(ctx, i + r, b).0);
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                // Sub-blocks 2s, 2s + 1's scales: i16 pairs per row, then each as i32 lanes.
                let pairs = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                    tile.sc[s][8 * h].as_ptr() as *const __m128i
                ));
                let sc = [
                    _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pairs)),
                    _mm256_srai_epi32::<16>(pairs),
                ];
                for (sub, sc) in sc.iter().enumerate() {
                    let mut isum = [_mm256_setzero_si256(); R];
                    for g in 2 * sub..2 * sub + 2 {
                        let w = _mm256_loadu_si256(tile.ql[s][g][8 * h].as_ptr() as *const __m256i);
                        let q =
                            _mm256_loadu_si256(tile.qh[s / 2][g][8 * h].as_ptr() as *const __m256i);
                        let (hl, hh) = if s % 2 == 0 {
                            (_mm256_slli_epi16::<4>(q), _mm256_slli_epi16::<2>(q))
                        } else {
                            (q, _mm256_srli_epi16::<2>(q))
                        };
                        let lo =
                            _mm256_or_si256(_mm256_and_si256(w, low4), _mm256_and_si256(hl, top2));
                        let hi = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(w), low4),
                            _mm256_and_si256(hh, top2),
                        );
                        for r in 0..R {
                            let xp = x[r].qs.as_ptr().add(32 * s + 8 * g);
                            isum[r] = D::dot4(isum[r], lo, bcast4(xp));
                            isum[r] = D::dot4(isum[r], hi, bcast4(xp.add(4)));
                        }
                    }
                    for r in 0..R {
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_mullo_epi32(isum[r], *sc));
                    }
                }
                // The -32 offset of sub-blocks 2s, 2s + 1: their scales against the lhs row's
                // two per-16 sums.
                for r in 0..R {
                    let sums = bcast4(x[r].bsums.as_ptr().add(2 * s));
                    let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(pairs, sums));
                    sumi[r] = _mm256_sub_epi32(sumi[r], off);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(8 * h) as *const __m128i));
            for r in 0..R {
                let dx = _mm256_set1_ps(lhs(ctx, i + r, b).1);
                acc[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dw, dx), acc[r]);
            }
        }
        let out = ctx.out as *mut f32;
        let j = t * TILE_ROWS + 8 * h;
        for (r, a) in acc.into_iter().enumerate() {
            _mm256_storeu_ps(out.add((i + r) * ctx.n + j), a);
        }
    }
}

/// The 512-bit kernel: a whole tile (16 weight rows) per vector, otherwise `avx2`'s.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{lhs, Ctx, TileQ6K, TILE_ROWS};
    use std::arch::x86_64::*;

    const TALL: usize = 4;
    const LHS_CHUNK: usize = 64;

    /// Weight rows `rows` (whole tiles) against every lhs row.
    ///
    /// # Safety
    /// Only called inside the AVX-512 entry point (`kernels/mod.rs`); `ctx` must describe live
    /// buffers of this format and `rows` lie within `0..ctx.n`, starting at a multiple of 16.
    #[inline(always)]
    pub(super) unsafe fn rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
            let i1 = ctx.m.min(i0 + LHS_CHUNK);
            for t in (rows.start / TILE_ROWS)..rows.end.div_ceil(TILE_ROWS) {
                let mut i = i0;
                while i + TALL <= i1 {
                    tile::<TALL>(ctx, i, t);
                    i += TALL;
                }
                match i1 - i {
                    0 => {}
                    1 => tile::<1>(ctx, i, t),
                    2 => tile::<2>(ctx, i, t),
                    _ => tile::<3>(ctx, i, t),
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn bcast4<T>(p: *const T) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Lhs rows `i..i + R` against tile `t` (weight rows `16t..16t + 16`).
    #[inline(always)]
    unsafe fn tile<const R: usize>(ctx: &Ctx, i: usize, t: usize) {
        let nb = ctx.nb;
        let tiles = (ctx.w as *const TileQ6K).add(t * nb);
        let low4 = _mm512_set1_epi8(0x0f);
        let top2 = _mm512_set1_epi8(0x30);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let tile = &*tiles.add(b);
            let x: [&super::Q8KBlock; R] = std::array::from_fn(|r| lhs(ctx, i + r, b).0);
            let mut sumi = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                let pairs =
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(tile.sc[s].as_ptr() as *const __m256i));
                let sc = [
                    _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pairs)),
                    _mm512_srai_epi32::<16>(pairs),
                ];
                for (sub, sc) in sc.iter().enumerate() {
                    let mut isum = [_mm512_setzero_si512(); R];
                    for g in 2 * sub..2 * sub + 2 {
                        let w = _mm512_loadu_si512(tile.ql[s][g].as_ptr() as *const __m512i);
                        let q = _mm512_loadu_si512(tile.qh[s / 2][g].as_ptr() as *const __m512i);
                        let (hl, hh) = if s % 2 == 0 {
                            (_mm512_slli_epi16::<4>(q), _mm512_slli_epi16::<2>(q))
                        } else {
                            (q, _mm512_srli_epi16::<2>(q))
                        };
                        let lo =
                            _mm512_or_si512(_mm512_and_si512(w, low4), _mm512_and_si512(hl, top2));
                        let hi = _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(w), low4),
                            _mm512_and_si512(hh, top2),
                        );
                        for r in 0..R {
                            let xp = x[r].qs.as_ptr().add(32 * s + 8 * g);
                            isum[r] = _mm512_dpbusd_epi32(isum[r], lo, bcast4(xp));
                            isum[r] = _mm512_dpbusd_epi32(isum[r], hi, bcast4(xp.add(4)));
                        }
                    }
                    for r in 0..R {
                        sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(isum[r], *sc));
                    }
                }
                for r in 0..R {
                    let sums = bcast4(x[r].bsums.as_ptr().add(2 * s));
                    let off = _mm512_slli_epi32::<5>(_mm512_madd_epi16(pairs, sums));
                    sumi[r] = _mm512_sub_epi32(sumi[r], off);
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const __m256i));
            for r in 0..R {
                let dx = _mm512_set1_ps(lhs(ctx, i + r, b).1);
                acc[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(dw, dx), acc[r]);
            }
        }
        let out = ctx.out as *mut f32;
        for (r, a) in acc.into_iter().enumerate() {
            _mm512_storeu_ps(out.add((i + r) * ctx.n + t * TILE_ROWS), a);
        }
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q6_k_tiled(lhs: &[f32], m: usize, w: &Q6KTiled, out: &mut [f32]) {
    super::matmul_with(cpu::isa(), lhs, m, w, out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_tiled_kernel;
    use super::*;

    #[test]
    fn matches_candle_and_every_path_gives_the_same_bits() {
        check_tiled_kernel::<CandleQ6K, _>(GgmlDType::Q6K, |t| Q6KTiled::from_qtensor(t).unwrap());
    }
}
