//! What the CPU can do, and the thread pool kernels split their work over.
//!
//! The instruction set is detected once, at run time, so one binary runs its best path on any
//! x86-64 (or falls back to portable code elsewhere); the build's `target-cpu` only decides what
//! the compiler may use outside `#[target_feature]` functions. Every kernel dispatches on
//! `isa()` and nothing else, so a new instruction set is a variant here, an entry point in
//! `CpuMatrix::rows` and a kernel in the formats that have one (AVX-512 and NEON are built that
//! way: `CpuMatrix::avx512_rows`, `CpuMatrix::neon_rows`).

use std::sync::OnceLock;

/// The SIMD paths the CPU kernels have.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Scalar,
    /// AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernels with AVX-512 VNNI's integer dot products on 256-bit vectors
    /// ([`avx2::Vnni`]): the same results, bit for bit, in fewer instructions.
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
    /// AVX-512 (F, BW, VL) with VNNI: formats with a 512-bit kernel use it (16 output lanes
    /// per vector, the same bits as their other paths); the others run their `Avx2Vnni`
    /// kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// NEON (every aarch64 CPU has it): the Q4_1 and Q8_0 kernels' NEON paths; the other
    /// formats run their portable kernels, which for the K-quants in place are candle's NEON
    /// dot products.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Isa {
    /// Every path this CPU can run, from the portable one up (what the kernels' tests
    /// compare).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                v.push(Isa::Avx2);
            }
            if has_avx2() && has_vnni() {
                v.push(Isa::Avx2Vnni);
            }
            if has_avx2() && has_vnni() && has_avx512() {
                v.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
        v
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

/// The best path this CPU has, chosen once.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() && has_vnni() && has_avx512() {
                return Isa::Avx512;
            }
            if has_avx2() && has_vnni() {
                return Isa::Avx2Vnni;
            }
            if has_avx2() {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            return Isa::Neon;
        }
        Isa::Scalar
    })
}

/// The instruction-set extensions this binary was compiled to assume (`target-cpu`, see
/// `.cargo/config.toml`) that the CPU it runs on lacks. Non-empty means the process would die
/// of an illegal instruction somewhere outside the kernels: refuse to start instead.
pub fn missing_build_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut missing = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if cfg!(target_feature = $f) && !std::arch::is_x86_feature_detected!($f) {
                    missing.push($f);
                }
            )*};
        }
        check!("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe", "avx512f");
    }
    missing
}

/// Runs `f` over `0..n` split into chunks on candle's own `barrier_pool()`, so our matmuls and
/// candle's ops share one set of workers and never compete for cores. (A pool of our own whose
/// waiters spin briefly and then park measured 10-27% slower on 2 quiet cores: its idle
/// workers and candle's then spin against each other.)
pub(crate) fn parallel_chunks(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, f)
}

/// Exact IEEE half -> single conversion.
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        // Infinity, or NaN made quiet as F16C does.
        sign | 0x7f80_0000 | (man << 13) | if man != 0 { 0x0040_0000 } else { 0 }
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// AVX2 helpers every AVX2 kernel shares.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The integer dot products the AVX2 kernels are built from, in two implementations that
    /// give the same integers: [`Avx2`]'s `maddubs` + `madd` and [`Vnni`]'s `vpdpbusd` /
    /// `vpdpwssd` (AVX-512 VNNI on 256-bit vectors), one or two instructions fewer per 32
    /// products. A kernel is written once, generic over `Dot` and `#[inline(always)]`, and
    /// compiled into one `#[target_feature]` entry point per [`super::Isa`] (`kernels/mod.rs`,
    /// `CpuMatrix::rows`), so each copy uses its own instructions and both give every output
    /// the same bits.
    pub(crate) trait Dot {
        /// `acc + Σ a·b` over each 4 bytes (`a` u8, `b` i8), per i32 lane. Exact while each
        /// pair `a[2t]·b[2t] + a[2t+1]·b[2t+1]` fits in i16 (`maddubs` saturates there; the
        /// callers' operands stay well inside).
        unsafe fn dot4(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
        /// `acc + Σ (a·b summed in pairs) · c` over each 4 bytes, `c` an i16 per pair: the
        /// per-sub-block scaled sum of the K-quants. Exact under the same bound.
        unsafe fn dot4_scaled(acc: __m256i, a: __m256i, b: __m256i, c: __m256i) -> __m256i;
    }

    /// AVX2's `maddubs` (u8 x i8 pairs into i16) then `madd` (i16 pairs into i32).
    pub(crate) enum Avx2 {}

    impl Dot for Avx2 {
        #[inline(always)]
        unsafe fn dot4(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            let p = _mm256_maddubs_epi16(a, b);
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }

        #[inline(always)]
        unsafe fn dot4_scaled(acc: __m256i, a: __m256i, b: __m256i, c: __m256i) -> __m256i {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), c))
        }
    }

    /// AVX-512 VNNI on 256-bit vectors: `vpdpbusd` (u8 x i8, four into an i32, accumulated)
    /// and `vpdpwssd` (i16 pairs, accumulated).
    pub(crate) enum Vnni {}

    impl Dot for Vnni {
        #[inline(always)]
        unsafe fn dot4(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, a, b)
        }

        #[inline(always)]
        unsafe fn dot4_scaled(acc: __m256i, a: __m256i, b: __m256i, c: __m256i) -> __m256i {
            _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(a, b), c)
        }
    }

    /// 8 f32 lanes in memory, aligned for one vector store.
    #[repr(C, align(32))]
    pub(crate) struct Lanes(pub(crate) [f32; 8]);

    /// `vbroadcastss` from memory, opaque to LLVM: a load instead of the shuffle LLVM would turn
    /// a store-then-broadcast into.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn bcast_mem(p: &f32) -> __m256 {
        let v: __m256;
        std::arch::asm!(
            "vbroadcastss {v}, dword ptr [{p}]",
            v = out(ymm_reg) v,
            p = in(reg) p as *const f32,
            options(pure, readonly, nostack, preserves_flags)
        );
        v
    }

    /// `(y.round()).clamp(-128.0, 127.0) as i8` per lane, as i32 lanes: `f32::round` (half
    /// away from zero) then Rust's saturating `as i8` (NaN gives 0). What both activation
    /// quantizers (`q8_1.rs`, `q8_k.rs`) need to match candle's scalar code bit for bit.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn round_to_i8(y: __m256) -> __m256i {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // Truncate |y|, add 1 if the (exact) fraction is >= 0.5, put the sign back.
        let ay = _mm256_and_ps(y, abs_mask);
        let tr = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(ay);
        let up = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_sub_ps(ay, tr), _mm256_set1_ps(0.5)),
            _mm256_set1_ps(1.0),
        );
        let r = _mm256_or_ps(_mm256_add_ps(tr, up), _mm256_andnot_ps(abs_mask, y));
        let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
    }

    /// 32 i32 lanes in `-128..=127` packed into 32 bytes, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn pack_i8(q: [__m256i; 4]) -> __m256i {
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        // packs leave the 4-lane groups as [a0 b0 c0 d0 a1 b1 c1 d1]; this restores a b c d.
        _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// Sum of the 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
        _mm_cvtsi128_si32(s)
    }

    /// Sum of the 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// NEON helpers the aarch64 kernels share.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// `Σ a[t] * b[t]` over 16 i8 pairs, added to `acc`'s 4 i32 lanes: widening multiplies
    /// (each product fits in i16) and pairwise widening adds, so every lane is an exact
    /// integer; the caller sums the lanes once per block.
    #[inline(always)]
    pub(crate) unsafe fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }

    /// Asks for the cache line at `p` (any address: a prefetch never faults).
    #[inline(always)]
    pub(crate) unsafe fn prefetch(p: *const u8) {
        std::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let a = f16_to_f32(h);
            // Independent decoding, in f64.
            let (e, man) = (((h >> 10) & 0x1f) as i32, (h & 0x3ff) as f64);
            let mag = match e {
                0 => man * 2f64.powi(-24),
                0x1f if man == 0.0 => f64::INFINITY,
                0x1f => f64::NAN,
                _ => (1.0 + man / 1024.0) * 2f64.powi(e - 15),
            };
            let want = if h & 0x8000 != 0 { -mag } else { mag } as f32;
            assert!(
                a.to_bits() == want.to_bits() || (a.is_nan() && want.is_nan()),
                "{h:#x}"
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("f16c") {
                assert_eq!(a.to_bits(), unsafe { hw_f16(h) }.to_bits(), "{h:#x}");
            }
        }
    }

    /// The NEON kernels are the ones aarch64 runs (and so the ones its kernel tests check).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_runs_the_neon_kernels() {
        assert_eq!(isa(), Isa::Neon);
        assert_eq!(Isa::available(), vec![Isa::Scalar, Isa::Neon]);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "f16c")]
    unsafe fn hw_f16(h: u16) -> f32 {
        use std::arch::x86_64::*;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }
}
