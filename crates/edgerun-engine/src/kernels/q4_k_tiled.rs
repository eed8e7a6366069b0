//! Q4_K weights repacked into 16-row tiles, x Q8_K activations: the kernel for prompt
//! processing and batched decoding of `Q4_K_M` files (their non-tied Q4_K matrices).
//!
//! # Why
//!
//! The in-place Q4_K kernel ([`super::q4_k`]) keeps GGML's layout, where a vector holds 32
//! values of one weight row: every 32 products cost a `maddubs` and a `madd` (or `vpdpwssd`),
//! and its 8-lhs-row tiles ran at 0.4x candle's repacked tiles at 32-128 tokens per step on an
//! AVX-512 VNNI host. Here a vector holds 4 values of each of 8 (or 16) weight rows, so one
//! `vpdpbusd` (or `maddubs` + `madd` on plain AVX2) against 4 broadcast activation bytes does
//! 32 products for 8 rows with no shuffles, the output lanes are the weight rows, and nothing
//! is summed across lanes.
//!
//! # Layout (one [`TileQ4K`] = 16 weight rows x one 256-value super-block)
//!
//! * `d`, `dmin`: the 16 rows' f16 scales, as in the file;
//! * `sc[s][r]`, `mn[p][r][t]`: the 6-bit scale of sub-block `s` and the min of sub-block
//!   `2p + t`, unpacked to bytes (mins in pairs, for one `madd` against two sub-block sums);
//! * `qs[((s * 4 + g) * 16 + r) * 4 + j]` = `q[s][8g + j] | q[s][8g + j + 4] << 4`: for each
//!   sub-block `s` and each 8 values `g`, 4 bytes per row, rows side by side.
//!
//! 2368 bytes against the file's 16 x 144 = 2304. The tiles *replace* the file's blocks
//! (candle's tensor is dropped after packing): no second copy. A Q4_K matrix shared with the
//! token embedding (tied) stays in place ([`super::q4_k`]), as does one whose row count is not
//! a multiple of 16.
//!
//! # Numerics (per output, whatever the batch, the ISA or the vector width)
//!
//! Per super-block: `isum_s = Σ q x` over sub-block `s` (exact i32), `sumi = Σ_s sc[s] isum_s`
//! and `summ = Σ_s m[s] Σ x_s` (exact); then `acc = fma(f32(sumi), d_w * d_x, acc)` and
//! `acc = fma(-f32(summ), dmin_w * d_x, acc)`. The output is `acc`. Every float operation is
//! per lane, in this order, so the portable path, AVX2, AVX2 with VNNI and any number of lhs
//! rows per tile give every output the same bits (tested).

use super::cpu::f16_to_f32;
use super::q4_k::scales_and_mins;
use super::q8_k::Q8KBlock;
use super::{cpu, forward_cpu, Activations, CpuMatrix, Ctx, TiledMatrix, QK_K, TILE_ROWS};
use candle_core::quantized::k_quants::BlockQ4K as CandleQ4K;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

/// 16 weight rows x one super-block of Q4_K, repacked (see the module docs).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct TileQ4K {
    /// f16 bits, per row.
    d: [u16; TILE_ROWS],
    /// f16 bits, per row.
    dmin: [u16; TILE_ROWS],
    /// `sc[s][r]`: sub-block `s`'s scale in row `r`.
    sc: [[u8; TILE_ROWS]; 8],
    /// `mn[p][r]`: row `r`'s mins of sub-blocks `2p` and `2p + 1`.
    mn: [[[u8; 2]; TILE_ROWS]; 4],
    /// `qs[s][g][r][j]`, two values per byte (see the module docs).
    qs: [[[[u8; 4]; TILE_ROWS]; 4]; 8],
}
const _: () = assert!(std::mem::size_of::<TileQ4K>() == 2368);

/// GGML's Q4_K super-block (candle's `BlockQ4K`), read while packing.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ4K {
    d: u16,
    dmin: u16,
    scales: [u8; 12],
    qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == std::mem::size_of::<CandleQ4K>());

/// A Q4_K weight matrix (n rows of k values, `n % 16 == 0`, `k % 256 == 0`) repacked into
/// tiles.
pub type Q4KTiled = TiledMatrix<TileQ4K>;

impl Q4KTiled {
    /// `Some(..)` when `t` is a 2-D Q4_K tensor on the CPU with a multiple of 16 rows of a
    /// multiple of 256 values; `None` otherwise. The caller drops `t` afterwards: the tiles
    /// are the only copy of the weights.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        Self::repack(t, GgmlDType::Q4K, pack)
    }

    /// `xs @ W^T`: `xs` of shape `(..., k)` on the CPU gives `(..., n)`; equivalent to
    /// `QMatMul::forward` on the same weights (to float rounding).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        forward_cpu(self, xs)
    }
}

/// One tile from its 16 rows' blocks (see the module docs for the layout).
fn pack(rows: &[BlockQ4K; TILE_ROWS]) -> TileQ4K {
    let mut tile = TileQ4K {
        d: [0; TILE_ROWS],
        dmin: [0; TILE_ROWS],
        sc: [[0; TILE_ROWS]; 8],
        mn: [[[0; 2]; TILE_ROWS]; 4],
        qs: [[[[0; 4]; TILE_ROWS]; 4]; 8],
    };
    for (r, blk) in rows.iter().enumerate() {
        tile.d[r] = blk.d;
        tile.dmin[r] = blk.dmin;
        let sm = scales_and_mins(&blk.scales);
        for s in 0..8 {
            tile.sc[s][r] = sm[s];
            tile.mn[s / 2][r][s % 2] = sm[8 + s];
        }
        let q = |s: usize, l: usize| (blk.qs[32 * (s / 2) + l] >> (4 * (s % 2))) & 0xf;
        for s in 0..8 {
            for g in 0..4 {
                for j in 0..4 {
                    tile.qs[s][g][r][j] = q(s, 8 * g + j) | q(s, 8 * g + j + 4) << 4;
                }
            }
        }
    }
    tile
}

impl CpuMatrix for Q4KTiled {
    const NAME: &'static str = "Q4KTiled";
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

/// The lhs rows of a [`Ctx`] as the kernels read them.
struct Lhs {
    nb: usize,
    m: usize,
    x: *const Q8KBlock,
    d: *const f32,
    sums: *const i16,
}

impl Lhs {
    fn new(ctx: &Ctx) -> Self {
        Self {
            nb: ctx.nb,
            m: ctx.m,
            x: ctx.qs as *const Q8KBlock,
            d: ctx.d8 as *const f32,
            sums: ctx.sums as *const i16,
        }
    }

    /// Block `b` of lhs row `i`.
    unsafe fn block(&self, i: usize, b: usize) -> &Q8KBlock {
        &*self.x.add(i * self.nb + b)
    }

    unsafe fn d(&self, i: usize, b: usize) -> f32 {
        *self.d.add(b * self.m + i)
    }

    /// The sums of sub-blocks `2p` and `2p + 1` of block `b` of lhs row `i`.
    unsafe fn sums(&self, i: usize, b: usize, p: usize) -> [i16; 2] {
        let at = self.sums.add(((b * 4 + p) * self.m + i) * 2);
        [*at, *at.add(1)]
    }
}

/// Portable kernel: the same integer sums and float operations, one output at a time.
///
/// # Safety
/// `ctx` must describe live buffers of this format and `rows` lie within `0..ctx.n`, starting
/// at a multiple of 16.
unsafe fn scalar_rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
    let lhs = Lhs::new(ctx);
    let tiles = ctx.w as *const TileQ4K;
    let out = ctx.out as *mut f32;
    for j in rows {
        let (t, r) = (j / TILE_ROWS, j % TILE_ROWS);
        for i in 0..ctx.m {
            let mut acc = 0f32;
            for b in 0..ctx.nb {
                let tile = &*tiles.add(t * ctx.nb + b);
                let x = lhs.block(i, b);
                let mut sumi = 0i32;
                for s in 0..8 {
                    let mut isum = 0i32;
                    for g in 0..4 {
                        for jj in 0..4 {
                            let byte = tile.qs[s][g][r][jj];
                            isum += (byte & 0xf) as i32 * x.qs[32 * s + 8 * g + jj] as i32
                                + (byte >> 4) as i32 * x.qs[32 * s + 8 * g + jj + 4] as i32;
                        }
                    }
                    sumi += tile.sc[s][r] as i32 * isum;
                }
                let mut summ = 0i32;
                for p in 0..4 {
                    let [s0, s1] = lhs.sums(i, b, p);
                    summ +=
                        tile.mn[p][r][0] as i32 * s0 as i32 + tile.mn[p][r][1] as i32 * s1 as i32;
                }
                let dx = lhs.d(i, b);
                acc = (sumi as f32).mul_add(f16_to_f32(tile.d[r]) * dx, acc);
                acc = (-(summ as f32)).mul_add(f16_to_f32(tile.dmin[r]) * dx, acc);
            }
            *out.add(i * ctx.n + j) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::cpu::avx2::Dot;
    use super::{Ctx, Lhs, TileQ4K, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Lhs rows per call of the tile kernel (its accumulators stay in registers).
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
        let lhs = Lhs::new(ctx);
        for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
            let i1 = ctx.m.min(i0 + LHS_CHUNK);
            for half in (rows.start / 8)..rows.end.div_ceil(8) {
                let mut i = i0;
                while i + TALL <= i1 {
                    half_tile::<D, TALL>(ctx, &lhs, i, half);
                    i += TALL;
                }
                match i1 - i {
                    0 => {}
                    1 => half_tile::<D, 1>(ctx, &lhs, i, half),
                    2 => half_tile::<D, 2>(ctx, &lhs, i, half),
                    _ => half_tile::<D, 3>(ctx, &lhs, i, half),
                }
            }
        }
    }

    /// 4 bytes of `p`, broadcast.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Lhs rows `i..i + R` against weight rows `8 * half..8 * half + 8` (half a tile).
    #[inline(always)]
    unsafe fn half_tile<D: Dot, const R: usize>(ctx: &Ctx, lhs: &Lhs, i: usize, half: usize) {
        let nb = ctx.nb;
        let (t, h) = (half / 2, half % 2);
        let tiles = (ctx.w as *const TileQ4K).add(t * nb);
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let tile = &*tiles.add(b);
            let xq: [*const i8; R] = std::array::from_fn(|r| lhs.block(i + r, b).qs.as_ptr());
            let mut sumi = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                let mut isum = [_mm256_setzero_si256(); R];
                for g in 0..4 {
                    let w = _mm256_loadu_si256(tile.qs[s][g][8 * h].as_ptr() as *const __m256i);
                    let lo = _mm256_and_si256(w, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), low);
                    for r in 0..R {
                        let x = xq[r].add(32 * s + 8 * g);
                        isum[r] = D::dot4(isum[r], lo, bcast4(x));
                        isum[r] = D::dot4(isum[r], hi, bcast4(x.add(4)));
                    }
                }
                let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    tile.sc[s].as_ptr().add(8 * h) as *const __m128i
                ));
                for r in 0..R {
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_mullo_epi32(isum[r], sc));
                }
            }
            // Mins: per pair of sub-blocks, the rows' (m[2p], m[2p + 1]) as i16 pairs against
            // the lhs row's two sub-block sums.
            let mut summ = [_mm256_setzero_si256(); R];
            for p in 0..4 {
                let mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                    tile.mn[p][8 * h].as_ptr() as *const __m128i
                ));
                for (r, summ) in summ.iter_mut().enumerate() {
                    let [s0, s1] = lhs.sums(i + r, b, p);
                    let pair = (s0 as u16 as u32 | (s1 as u16 as u32) << 16) as i32;
                    *summ =
                        _mm256_add_epi32(*summ, _mm256_madd_epi16(mins, _mm256_set1_epi32(pair)));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(tile.d.as_ptr().add(8 * h) as *const __m128i));
            let dminw = _mm256_cvtph_ps(_mm_loadu_si128(
                tile.dmin.as_ptr().add(8 * h) as *const __m128i
            ));
            for r in 0..R {
                let dx = _mm256_set1_ps(lhs.d(i + r, b));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dw, dx), acc[r]);
                acc[r] = _mm256_fnmadd_ps(
                    _mm256_cvtepi32_ps(summ[r]),
                    _mm256_mul_ps(dminw, dx),
                    acc[r],
                );
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
    use super::{Ctx, Lhs, TileQ4K, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Lhs rows per call of the tile kernel.
    const TALL: usize = 4;
    /// Lhs rows whose quants stay in cache while a work item's tiles pass over them.
    const LHS_CHUNK: usize = 64;

    /// Weight rows `rows` (whole tiles) against every lhs row.
    ///
    /// # Safety
    /// Only called inside the AVX-512 entry point (`kernels/mod.rs`); `ctx` must describe live
    /// buffers of this format and `rows` lie within `0..ctx.n`, starting at a multiple of 16.
    #[inline(always)]
    pub(super) unsafe fn rows(ctx: &Ctx, rows: std::ops::Range<usize>) {
        let lhs = Lhs::new(ctx);
        for i0 in (0..ctx.m).step_by(LHS_CHUNK) {
            let i1 = ctx.m.min(i0 + LHS_CHUNK);
            for t in (rows.start / TILE_ROWS)..rows.end.div_ceil(TILE_ROWS) {
                let mut i = i0;
                while i + TALL <= i1 {
                    tile::<TALL>(ctx, &lhs, i, t);
                    i += TALL;
                }
                match i1 - i {
                    0 => {}
                    1 => tile::<1>(ctx, &lhs, i, t),
                    2 => tile::<2>(ctx, &lhs, i, t),
                    _ => tile::<3>(ctx, &lhs, i, t),
                }
            }
        }
    }

    /// 4 bytes of `p`, broadcast.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Lhs rows `i..i + R` against tile `t` (weight rows `16t..16t + 16`).
    #[inline(always)]
    unsafe fn tile<const R: usize>(ctx: &Ctx, lhs: &Lhs, i: usize, t: usize) {
        let nb = ctx.nb;
        let tiles = (ctx.w as *const TileQ4K).add(t * nb);
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let tile = &*tiles.add(b);
            let xq: [*const i8; R] = std::array::from_fn(|r| lhs.block(i + r, b).qs.as_ptr());
            let mut sumi = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                let mut isum = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    let w = _mm512_loadu_si512(tile.qs[s][g].as_ptr() as *const __m512i);
                    let lo = _mm512_and_si512(w, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
                    for r in 0..R {
                        let x = xq[r].add(32 * s + 8 * g);
                        isum[r] = _mm512_dpbusd_epi32(isum[r], lo, bcast4(x));
                        isum[r] = _mm512_dpbusd_epi32(isum[r], hi, bcast4(x.add(4)));
                    }
                }
                let sc =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(tile.sc[s].as_ptr() as *const __m128i));
                for r in 0..R {
                    sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(isum[r], sc));
                }
            }
            let mut summ = [_mm512_setzero_si512(); R];
            for p in 0..4 {
                let mins =
                    _mm512_cvtepu8_epi16(_mm256_loadu_si256(tile.mn[p].as_ptr() as *const __m256i));
                for (r, summ) in summ.iter_mut().enumerate() {
                    let [s0, s1] = lhs.sums(i + r, b, p);
                    let pair = (s0 as u16 as u32 | (s1 as u16 as u32) << 16) as i32;
                    *summ =
                        _mm512_add_epi32(*summ, _mm512_madd_epi16(mins, _mm512_set1_epi32(pair)));
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.d.as_ptr() as *const __m256i));
            let dminw = _mm512_cvtph_ps(_mm256_loadu_si256(tile.dmin.as_ptr() as *const __m256i));
            for r in 0..R {
                let dx = _mm512_set1_ps(lhs.d(i + r, b));
                acc[r] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(dw, dx), acc[r]);
                acc[r] = _mm512_fnmadd_ps(
                    _mm512_cvtepi32_ps(summ[r]),
                    _mm512_mul_ps(dminw, dx),
                    acc[r],
                );
            }
        }
        let out = ctx.out as *mut f32;
        for (r, a) in acc.into_iter().enumerate() {
            _mm512_storeu_ps(out.add((i + r) * ctx.n + t * TILE_ROWS), a);
        }
    }
}

/// The raw kernel: `out[i * n + j] = dot(lhs row i, weight row j)`.
pub fn matmul_q4_k_tiled(lhs: &[f32], m: usize, w: &Q4KTiled, out: &mut [f32]) {
    super::matmul_with(cpu::isa(), lhs, m, w, out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::check_tiled_kernel;
    use super::*;

    #[test]
    fn matches_candle_and_every_path_gives_the_same_bits() {
        check_tiled_kernel::<CandleQ4K, _>(GgmlDType::Q4K, |t| Q4KTiled::from_qtensor(t).unwrap());
    }
}
