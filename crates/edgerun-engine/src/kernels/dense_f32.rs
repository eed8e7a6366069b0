//! Dense f32 linear layers on the CPU, `y = x·Wᵀ + b`, for the encoders' weights
//! ([`crate::models::bert`]'s CPU forward).
//!
//! The weights are repacked once at load time into panels of [`PANEL`] outputs: panel `p` holds,
//! for each input index `k`, the 32 weights `W[32p .. 32p + 32][k]` side by side (64-byte
//! aligned, the last panel padded with zero rows). A micro-tile of up to [`MR`] rows × 32
//! outputs then keeps its 24 sums in AVX-512 registers for the whole of `k`: per input index,
//! two aligned loads of the panel and one broadcast of each row's input feed 24 fused
//! multiply-adds. The panel (`k × 128` bytes: 48 KiB for all-MiniLM's k = 384, 512 KiB for
//! BERT-large's widest, 4096) stays in L1/L2 across the row tiles of a block of [`MC`] rows,
//! and that block stays in L2
//! across the panels; the units of work (a block of rows × one panel) are shared out over the
//! kernels' thread pool (`cpu::parallel_chunks`).
//!
//! * **Row invariance**: every output is its bias plus the products in increasing `k`, one
//!   fused multiply-add at a time, whatever rows are beside it: an input's result does not
//!   depend on the batch it came in (what makes an embedding the same alone or batched).
//! * The epilogue may apply an activation (BERT's erf GELU) to a tile while it is in L1
//!   ([`Activation`]).
//! * AVX-512, or AVX2 with FMA (the `avx2` tile: 6 rows × 16 outputs at a time, the same
//!   bits): [`DenseF32::available`] says whether this CPU runs it; elsewhere (aarch64, older
//!   x86) the encoder keeps candle's.

use super::cpu;

/// Outputs per panel (two AVX-512 vectors).
pub const PANEL: usize = 32;
/// Rows per micro-tile: 12 × 2 accumulators, 2 panel loads and a broadcast in 32 registers.
pub const MR: usize = 12;
/// Rows per unit of work (a multiple of [`MR`]).
pub const MC: usize = 8 * MR;

/// What the epilogue applies to `x·Wᵀ + b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// `x · (1 + erf(x / √2)) / 2`, with [`gelu_erf`].
    GeluErf,
    /// GELU's tanh approximation ([`gelu_tanh`], `gelu_new`).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

/// A linear layer's weights repacked into panels, with its bias.
pub struct DenseF32 {
    n: usize,
    k: usize,
    /// `panels × k × PANEL` weights, panel-major.
    packed: Vec<Line>,
    /// `panels × PANEL`, zero past `n`.
    bias: Vec<Line>,
}

impl DenseF32 {
    /// Whether this CPU runs the kernel (AVX-512F).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(
            cpu::isa(),
            cpu::Isa::Avx512 | cpu::Isa::Avx2Vnni | cpu::Isa::Avx2
        );
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Packs `weight` (`n × k`, row-major, as PyTorch's `Linear` stores it) and `bias` (`n`
    /// values, or none: zeros).
    pub fn new(weight: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(weight.len(), n * k, "weight is not {n} × {k}");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias is not {n} long");
        }
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![Line([0.0; 16]); panels * k * 2];
        let flat = lines_mut(&mut packed);
        for (row, w) in weight.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, j) = (row / PANEL, row % PANEL);
            for (kk, &v) in w.iter().enumerate() {
                flat[(p * k + kk) * PANEL + j] = v;
            }
        }
        let mut b = vec![Line([0.0; 16]); panels * 2];
        if let Some(bias) = bias {
            lines_mut(&mut b)[..n].copy_from_slice(bias);
        }
        Self {
            n,
            k,
            packed,
            bias: b,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// `out = act(x·Wᵀ + b)` for the `m = x.len() / k` rows of `x` (row-major), into `out`
    /// (`m × n`). Panics if the lengths disagree or the CPU lacks AVX-512
    /// ([`DenseF32::available`]).
    pub fn forward(&self, x: &[f32], out: &mut [f32], act: Activation) {
        assert!(
            Self::available(),
            "the dense f32 kernel needs AVX2 or AVX-512"
        );
        let (n, k) = (self.n, self.k);
        assert!(
            k > 0 && x.len().is_multiple_of(k),
            "input is not rows of {k}"
        );
        let m = x.len() / k;
        assert_eq!(out.len(), m * n, "output is not {m} × {n}");
        let panels = n.div_ceil(PANEL);
        let blocks = m.div_ceil(MC);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let packed = lines(&self.packed);
        let bias = lines(&self.bias);
        // Units of work: a block of MC rows × a group of panels. Each unit packs its block
        // (into its thread's buffer, kept while the next unit has the same block); a large
        // batch gives every unit all the panels (each block packed once), a short one splits
        // the panels into groups so that both threads have work.
        let threads = cpu::threads();
        let per_group = panels.div_ceil((4 * threads).div_ceil(blocks).clamp(1, panels));
        let groups = panels.div_ceil(per_group);
        cpu::parallel_chunks(blocks * groups, |units| {
            let out_ptr = &out_ptr;
            PACKED_ROWS.with_borrow_mut(|buf| {
                let mut have = usize::MAX;
                for unit in units {
                    let (block, g) = (unit / groups, unit % groups);
                    let rows = block * MC..m.min(block * MC + MC);
                    if have != block {
                        buf.resize(rows.len() * k, 0.0);
                        for r in rows.clone().step_by(MR) {
                            let t = MR.min(rows.end - r);
                            let at = (r - rows.start) * k;
                            // SAFETY: rows r..r + t of `x` (asserted m × k) into `buf`
                            // (rows.len() × k).
                            unsafe {
                                pack_tile(x.as_ptr().add(r * k), k, t, k, buf[at..].as_mut_ptr())
                            };
                        }
                        have = block;
                    }
                    for p in g * per_group..panels.min((g + 1) * per_group) {
                        let cols = PANEL.min(n - p * PANEL);
                        // SAFETY: AVX-512F is present (asserted above); this reads the packed
                        // block (rows.len() × k), panel p (k × PANEL, aligned) and its 32
                        // biases (aligned), and writes `cols` outputs of those rows of `out`,
                        // which no other unit writes (units own disjoint (rows, panels)).
                        unsafe {
                            panel_rows(
                                buf.as_ptr(),
                                rows.len(),
                                k,
                                packed[p * k * PANEL..].as_ptr(),
                                bias[p * PANEL..].as_ptr(),
                                out_ptr.0.add(rows.start * n + p * PANEL),
                                n,
                                cols,
                                act,
                            );
                        }
                    }
                }
            });
        });
    }
}

thread_local! {
    /// A block of [`DenseF32::forward`]'s input rows, packed by [`pack_tile`] (any thread of the
    /// pool).
    static PACKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The same for [`Panels::matmul_to`] (any thread of the pool).
    static PACKED_PANEL_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs `r` (≤ [`MR`]) rows of `k` inputs (stride `lda`) for a micro-tile: input `p` of row
/// `i` goes to `dst[p·r + i]`, so the tile reads each step's `r` inputs from one place, at
/// constant offsets (no per-row address arithmetic in its loop).
///
/// # Safety
/// `a` readable for `r` rows of `k` at stride `lda`; `dst` writable for `k · r` values.
unsafe fn pack_tile(a: *const f32, lda: usize, r: usize, k: usize, dst: *mut f32) {
    for i in 0..r {
        let row = std::slice::from_raw_parts(a.add(i * lda), k);
        for (p, &v) in row.iter().enumerate() {
            *dst.add(p * r + i) = v;
        }
    }
}

/// `m` rows × one panel: tile after tile of [`MR`] rows, then the activation while each tile is
/// in L1.
///
/// # Safety
/// AVX-512F; `a` readable for `m` rows of `k` packed tile by tile ([`pack_tile`], the tile at
/// row `r` from `a + r·k`); `panel` (`k × PANEL`) and `bias` (`PANEL`) 64-byte aligned; `out`
/// writable for `m` rows of `cols` at stride `ldo`.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(
    a: *const f32,
    m: usize,
    k: usize,
    panel: *const f32,
    bias: *const f32,
    out: *mut f32,
    ldo: usize,
    cols: usize,
    act: Activation,
) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the dense f32 kernel is x86-64 only ({m} × {k} → {ldo}, {cols} {act:?}, {a:?} {panel:?} {bias:?} {out:?})");
    #[cfg(target_arch = "x86_64")]
    {
        let mut r = 0;
        while r < m {
            let tile = MR.min(m - r);
            let tiler = if wide() {
                avx512::tile_dyn
            } else {
                avx2::tile_dyn
            };
            tiler(
                tile,
                a.add(r * k),
                k,
                panel,
                bias,
                out.add(r * ldo),
                ldo,
                cols,
            );
            if act != Activation::None {
                for i in r..r + tile {
                    let row = std::slice::from_raw_parts_mut(out.add(i * ldo), cols);
                    if wide() {
                        avx512::activate(row, act)
                    } else {
                        activate(row, act)
                    }
                }
            }
            r += tile;
        }
    }
}

/// Panels packed on the fly from any matrix, in a buffer kept between uses: attention packs a
/// head's keys (for `q·kᵀ`) and values (for `p·v`) into one each and multiplies with
/// [`Panels::matmul`], the same micro-tile as the linear layers, on the calling thread.
#[derive(Default)]
pub struct Panels {
    lines: Vec<Line>,
    n: usize,
    k: usize,
}

static ZERO_BIAS: [Line; 2] = [Line([0.0; 16]); 2];

impl Panels {
    /// Packs the `n × k` matrix whose output `j` has weight `w(j, p)` for input `p` (zero rows
    /// pad the last panel).
    pub fn pack(&mut self, n: usize, k: usize, w: impl Fn(usize, usize) -> f32) {
        let panels = n.div_ceil(PANEL);
        self.lines.clear();
        self.lines.resize(panels * k * 2, Line([0.0; 16]));
        let flat = lines_mut(&mut self.lines);
        for j in 0..n {
            let (p, c) = (j / PANEL, j % PANEL);
            for q in 0..k {
                flat[(p * k + q) * PANEL + c] = w(j, q);
            }
        }
        (self.n, self.k) = (n, k);
    }

    /// Like [`Panels::pack`], where input `p`'s weights for every output are the contiguous
    /// `row(p)` (`n` values): a row-major `k × n` matrix, copied a row at a time.
    pub fn pack_rows<'a>(&mut self, n: usize, k: usize, row: impl Fn(usize) -> &'a [f32]) {
        let panels = n.div_ceil(PANEL);
        self.lines.clear();
        self.lines.resize(panels * k * 2, Line([0.0; 16]));
        let flat = lines_mut(&mut self.lines);
        for q in 0..k {
            let r = &row(q)[..n];
            for (p, chunk) in r.chunks(PANEL).enumerate() {
                flat[(p * k + q) * PANEL..][..chunk.len()].copy_from_slice(chunk);
            }
        }
        (self.n, self.k) = (n, k);
    }

    /// `out[i·ldo + j] = Σ_p a[i·lda + p] · W[j][p]` for `m` rows, on the calling thread.
    /// Panics if a slice is too short or the CPU lacks AVX-512.
    pub fn matmul(&self, a: &[f32], lda: usize, m: usize, out: &mut [f32], ldo: usize) {
        if m == 0 || self.n == 0 {
            return;
        }
        assert!(
            ldo >= self.n && out.len() >= (m - 1) * ldo + self.n,
            "output too short"
        );
        // SAFETY: `out` holds the m rows of n at stride ldo (asserted).
        unsafe { self.matmul_to(a, lda, m, out.as_mut_ptr(), ldo) }
    }

    /// [`Panels::matmul`] into rows that other threads' columns may sit between (a head's
    /// columns of attention's output).
    ///
    /// # Safety
    /// `out` writable for `m` rows of `n` values at stride `ldo`, which nothing else reads or
    /// writes meanwhile.
    pub unsafe fn matmul_to(&self, a: &[f32], lda: usize, m: usize, out: *mut f32, ldo: usize) {
        assert!(
            DenseF32::available(),
            "the dense f32 kernel needs AVX2 or AVX-512"
        );
        let (n, k) = (self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        assert!(lda >= k && a.len() >= (m - 1) * lda + k, "input too short");
        let flat = lines(&self.lines);
        PACKED_PANEL_ROWS.with_borrow_mut(|rows| {
            rows.resize(m * k, 0.0);
            let mut r = 0;
            while r < m {
                // SAFETY: rows r.. of `a` (asserted above) into their place in `rows` (m × k).
                unsafe {
                    pack_tile(
                        a.as_ptr().add(r * lda),
                        lda,
                        MR.min(m - r),
                        k,
                        rows.as_mut_ptr().add(r * k),
                    )
                };
                r += MR;
            }
            for p in 0..n.div_ceil(PANEL) {
                // SAFETY: AVX-512F is present; `a`'s bounds asserted above, `out`'s the caller's;
                // the panel and the zero bias are 64-byte aligned.
                unsafe {
                    panel_rows(
                        rows.as_ptr(),
                        m,
                        k,
                        flat[p * k * PANEL..].as_ptr(),
                        lines(&ZERO_BIAS).as_ptr(),
                        out.add(p * PANEL),
                        ldo,
                        PANEL.min(n - p * PANEL),
                        Activation::None,
                    );
                }
            }
        });
    }
}

struct SendPtr(*mut f32);
// SAFETY: the units of `forward` write disjoint parts of the output through it.
unsafe impl Sync for SendPtr {}

fn lines(v: &[Line]) -> &[f32] {
    // SAFETY: `Line` is 16 f32s with no padding (repr(C), 64 bytes, align 64).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 16) }
}

fn lines_mut(v: &mut [Line]) -> &mut [f32] {
    // SAFETY: as `lines`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 16) }
}

/// GELU with the exact erf, `x · (1 + erf(x / √2)) / 2`: erf from Abramowitz & Stegun 7.1.26
/// (absolute error below 1.5e-7, about f32's own rounding of values near 1) over the
/// vectorisable `exp` of the attention kernel, so a loop of it vectorises.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / P.mul_add(z, 1.0);
    let poly = t * A[4]
        .mul_add(t, A[3])
        .mul_add(t, A[2])
        .mul_add(t, A[1])
        .mul_add(t, A[0]);
    let erf = 1.0 - poly * super::attention::exp_nonpositive(-z * z);
    0.5 * x * (1.0 + erf.copysign(x))
}

/// GELU's tanh approximation, `x · (1 + tanh(√(2/π) · (x + 0.044715 x³))) / 2`, with tanh from
/// the same vectorisable `exp`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let y = C * (0.044_715 * x * x).mul_add(x, x);
    let e = super::attention::exp_nonpositive(-2.0 * y.abs());
    let tanh = ((1.0 - e) / (1.0 + e)).copysign(y);
    0.5 * x * (1.0 + tanh)
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static AVX2_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the AVX2 tile even on an AVX-512 CPU (for tests and benchmarks of the AVX2 path; both
/// give the same bits, so flipping it while other threads compute changes no result).
pub fn force_avx2(on: bool) {
    AVX2_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The tile that runs: `"avx512"` or `"avx2"`.
pub fn tile_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        return "avx512";
    }
    "avx2"
}

/// Whether the AVX-512 tile runs.
#[cfg(target_arch = "x86_64")]
fn wide() -> bool {
    matches!(cpu::isa(), cpu::Isa::Avx512) && !AVX2_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// `act` over `row` at the build's vector width (AVX2).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn activate(row: &mut [f32], act: Activation) {
    match act {
        Activation::None => {}
        Activation::GeluErf => row.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        Activation::GeluTanh => row.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// The micro-tile on AVX2 (16 registers): a packed tile of up to [`MR`] rows in groups of
/// up to 6 rows × 16 outputs (12 sums in registers), each panel in two halves. The same fused
/// multiply-adds in the same order per output as the AVX-512 tile: the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// As `avx512::tile_dyn`, on AVX2 and FMA.
    ///
    /// # Safety
    /// As `avx512::tile_dyn`, with AVX2 and FMA instead of AVX-512F.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_dyn(
        rows: usize,
        a: *const f32,
        k: usize,
        panel: *const f32,
        bias: *const f32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let mut i0 = 0;
        while i0 < rows {
            let g = 6.min(rows - i0);
            for half in 0..2 {
                let c0 = half * 16;
                if c0 >= cols {
                    break;
                }
                let n = 16.min(cols - c0);
                let (a, p, b, o) = (
                    a.add(i0),
                    panel.add(c0),
                    bias.add(c0),
                    out.add(i0 * ldo + c0),
                );
                match g {
                    1 => group::<1>(a, rows, k, p, b, o, ldo, n),
                    2 => group::<2>(a, rows, k, p, b, o, ldo, n),
                    3 => group::<3>(a, rows, k, p, b, o, ldo, n),
                    4 => group::<4>(a, rows, k, p, b, o, ldo, n),
                    5 => group::<5>(a, rows, k, p, b, o, ldo, n),
                    _ => group::<6>(a, rows, k, p, b, o, ldo, n),
                }
            }
            i0 += g;
        }
    }

    /// `G` rows × 16 outputs: row `i`'s input `p` at `a[p·stride + i]`, the outputs' weights
    /// at `panel[p·PANEL ..][..16]` (32-byte aligned), `cols` (≤ 16) of them written.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group<const G: usize>(
        a: *const f32,
        stride: usize,
        k: usize,
        panel: *const f32,
        bias: *const f32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let b0 = _mm256_loadu_ps(bias);
        let b1 = _mm256_loadu_ps(bias.add(8));
        let mut lo = [b0; G];
        let mut hi = [b1; G];
        for p in 0..k {
            let w0 = _mm256_load_ps(panel.add(p * PANEL));
            let w1 = _mm256_load_ps(panel.add(p * PANEL + 8));
            for i in 0..G {
                let v = _mm256_set1_ps(*a.add(p * stride + i));
                lo[i] = _mm256_fmadd_ps(v, w0, lo[i]);
                hi[i] = _mm256_fmadd_ps(v, w1, hi[i]);
            }
        }
        for i in 0..G {
            if cols == 16 {
                _mm256_storeu_ps(out.add(i * ldo), lo[i]);
                _mm256_storeu_ps(out.add(i * ldo + 8), hi[i]);
            } else {
                let mut tmp = [0f32; 16];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi[i]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(i * ldo), cols);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activation, MR, PANEL};
    use std::arch::x86_64::*;

    /// [`tile`] for `rows` (1..=MR) rows.
    ///
    /// # Safety
    /// As [`tile`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_dyn(
        rows: usize,
        a: *const f32,
        k: usize,
        panel: *const f32,
        bias: *const f32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => tile::<$r>(a, k, panel, bias, out, ldo, cols),)*
                    _ => unreachable!("a tile of {rows} rows"),
                }
            };
        }
        const _: () = assert!(MR == 12);
        go!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// `R` rows × 32 outputs: `out[i][j] = bias[j] + Σ_p a[i][p] · panel[p][j]` for `j <
    /// cols`, `p < k`.
    ///
    /// # Safety
    /// AVX-512F; `a` readable for `R` rows of `k` packed by [`super::pack_tile`] (`a[p·R +
    /// i]`), `panel` for `k × 32` values and 64-byte aligned, `bias` for 32 and aligned, `out`
    /// writable for `R` rows of `cols` at stride `ldo`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        k: usize,
        panel: *const f32,
        bias: *const f32,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let b0 = _mm512_load_ps(bias);
        let b1 = _mm512_load_ps(bias.add(16));
        let mut lo = [b0; R];
        let mut hi = [b1; R];
        for p in 0..k {
            let w0 = _mm512_load_ps(panel.add(p * PANEL));
            let w1 = _mm512_load_ps(panel.add(p * PANEL + 16));
            for i in 0..R {
                let v = _mm512_set1_ps(*a.add(p * R + i));
                lo[i] = _mm512_fmadd_ps(v, w0, lo[i]);
                hi[i] = _mm512_fmadd_ps(v, w1, hi[i]);
            }
        }
        if cols == PANEL {
            for i in 0..R {
                _mm512_storeu_ps(out.add(i * ldo), lo[i]);
                _mm512_storeu_ps(out.add(i * ldo + 16), hi[i]);
            }
        } else {
            let m0: __mmask16 = if cols >= 16 {
                0xffff
            } else {
                (1u16 << cols) - 1
            };
            let m1: __mmask16 = if cols <= 16 {
                0
            } else {
                ((1u32 << (cols - 16)) - 1) as u16
            };
            for i in 0..R {
                _mm512_mask_storeu_ps(out.add(i * ldo), m0, lo[i]);
                _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, hi[i]);
            }
        }
    }

    /// `act` over `row`, vectorised at AVX-512 width.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn activate(row: &mut [f32], act: Activation) {
        match act {
            Activation::None => {}
            Activation::GeluErf => row.iter_mut().for_each(|v| *v = super::gelu_erf(*v)),
            Activation::GeluTanh => row.iter_mut().for_each(|v| *v = super::gelu_tanh(*v)),
            Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], b: &[f32], n: usize, k: usize) -> Vec<f32> {
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b[j];
                for kk in 0..k {
                    s = x[i * k + kk].mul_add(w[j * k + kk], s);
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 20_001) as f32 / 10_000.0 - 1.0
            })
            .collect()
    }

    /// Every output is the bias plus the products in order, one fused multiply-add at a
    /// time: bit for bit the scalar loop, for tails of rows and columns, one row or many.
    /// The AVX2 tile too (forced) where the CPU has AVX-512: the same bits.
    #[test]
    fn the_avx2_tile_matches_the_scalar_fused_loop_bit_for_bit() {
        if !DenseF32::available() {
            eprintln!("skipped: neither AVX2 nor AVX-512 on this CPU");
            return;
        }
        force_avx2(true);
        let result = std::panic::catch_unwind(|| {
            matches_the_scalar_fused_loop_bit_for_bit();
            panels_multiply_strided_rows_like_the_scalar_loop();
        });
        force_avx2(false);
        result.unwrap();
    }

    #[test]
    fn matches_the_scalar_fused_loop_bit_for_bit() {
        if !DenseF32::available() {
            eprintln!("skipped: neither AVX2 nor AVX-512 on this CPU");
            return;
        }
        for &(m, n, k) in &[
            (1, 32, 8),
            (13, 40, 33),
            (100, 64, 384),
            (97, 70, 5),
            (200, 96, 64),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let b = values(n, 3);
            let dense = DenseF32::new(&w, n, k, Some(&b));
            let mut out = vec![f32::NAN; m * n];
            dense.forward(&x, &mut out, Activation::None);
            let want = reference(&x, &w, &b, n, k);
            assert!(
                out.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{m} × {n} × {k}"
            );
            let mut gelu = vec![0f32; m * n];
            dense.forward(&x, &mut gelu, Activation::GeluErf);
            for (g, w) in gelu.iter().zip(&want) {
                assert_eq!(g.to_bits(), gelu_erf(*w).to_bits());
            }
        }
    }

    /// Panels packed on the fly (both ways) multiply like the packed layer, into strided rows,
    /// leaving the columns between untouched.
    #[test]
    fn panels_multiply_strided_rows_like_the_scalar_loop() {
        if !DenseF32::available() {
            return;
        }
        for &(m, n, k, lda, ldo) in &[
            (7, 32, 32, 96, 64),
            (60, 60, 32, 1152, 70),
            (13, 33, 1, 1, 40),
        ] {
            let a = values((m - 1) * lda + k, 6);
            let w = values(n * k, 7);
            let want = reference(
                &(0..m)
                    .flat_map(|i| a[i * lda..i * lda + k].to_vec())
                    .collect::<Vec<_>>(),
                &w,
                &vec![0.0; n],
                n,
                k,
            );
            let mut by_element = Panels::default();
            by_element.pack(n, k, |j, p| w[j * k + p]);
            // The same matrix given as rows of its transpose.
            let wt: Vec<f32> = (0..k)
                .flat_map(|p| (0..n).map(move |j| (p, j)))
                .map(|(p, j)| w[j * k + p])
                .collect();
            let mut by_rows = Panels::default();
            by_rows.pack_rows(n, k, |p| &wt[p * n..(p + 1) * n]);
            for panels in [&by_element, &by_rows] {
                let mut out = vec![f32::NAN; (m - 1) * ldo + n + 3];
                panels.matmul(&a, lda, m, &mut out, ldo);
                for i in 0..m {
                    let got = &out[i * ldo..i * ldo + n];
                    assert!(
                        got.iter()
                            .zip(&want[i * n..(i + 1) * n])
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{m} × {n} × {k}, row {i}"
                    );
                    if i + 1 < m {
                        assert!(
                            out[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()),
                            "between rows"
                        );
                    }
                }
            }
        }
    }

    /// A row's result is the same alone as in a batch (row invariance).
    #[test]
    fn a_row_is_the_same_alone_and_batched() {
        if !DenseF32::available() {
            return;
        }
        let (m, n, k) = (150, 96, 128);
        let x = values(m * k, 4);
        let dense = DenseF32::new(&values(n * k, 5), n, k, None);
        let mut all = vec![0f32; m * n];
        dense.forward(&x, &mut all, Activation::None);
        for i in [0, 11, 12, 95, 96, 149] {
            let mut one = vec![0f32; n];
            dense.forward(&x[i * k..(i + 1) * k], &mut one, Activation::None);
            assert_eq!(one, all[i * n..(i + 1) * n]);
        }
    }
}
