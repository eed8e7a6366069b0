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

/// Runs `f` over `0..n` split into chunks on the kernels' [`pool`]: the calling thread and the
/// pool's workers take chunks from a shared cursor until none are left.
pub(crate) fn parallel_chunks(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    pool::get().run(n, &f)
}

/// How many threads [`parallel_chunks`] spreads work over (the caller and the pool's workers).
pub(crate) fn threads() -> usize {
    pool::get().threads()
}

/// The kernels' thread pool: candle's thread count (`RAYON_NUM_THREADS`, which the server sets
/// from `--threads`), the caller being one of them.
///
/// Why not candle's `barrier_pool()`, which our kernels used before: its caller waits for every
/// worker by spinning without end, even a worker that has not started. On a CPU shared with
/// another busy process a descheduled worker then costs the caller its whole time slice at
/// every matmul: a 200-token SmolLM2 decode took 17-35 s instead of 1.3 s beside one busy loop
/// on 2 cores (1.5-2.8 s on this pool; 2026-12-02). Here:
/// * a worker joins a call only while it is open; the caller closes it once the chunks are all
///   taken and then waits only for workers that joined (each holding at most one chunk), so a
///   worker that was not running costs nothing;
/// * everyone waits by spinning briefly, then parking: idle workers spin [`pool::WORKER_SPIN`]
///   (long enough to span the gaps between a step's matmuls), the caller spins
///   [`pool::CALLER_SPIN`] for the last chunks before sleeping until the last worker wakes it.
///
/// Candle's own ops (large elementwise ones, formats it serves) still run on its barrier pool,
/// whose idle workers spin 25,000 times before parking; against this pool's workers that cost
/// 10-27% on 2 quiet cores, so the server shortens their spin (`CANDLE_BARRIER_POOL_SPIN_LIMIT`,
/// unless set): then the two measured the same as one shared pool.
pub(crate) mod pool {
    use std::cell::UnsafeCell;
    use std::ops::Range;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
    use std::sync::{Mutex, OnceLock};
    use std::thread::Thread;
    use std::time::{Duration, Instant};

    /// How long an idle worker spins before parking.
    pub(crate) const WORKER_SPIN: Duration = Duration::from_micros(300);
    /// How long the caller spins for the workers' last chunks before parking.
    pub(crate) const CALLER_SPIN: Duration = Duration::from_micros(50);

    /// `state`: the call's number from bit 17, CLOSED, and in the low bits how many workers
    /// are inside the call.
    const CLOSED: usize = 1 << 16;
    const COUNT: usize = CLOSED - 1;
    const GEN_SHIFT: u32 = 17;

    /// One call's work, type-erased: `call(data, range)` runs the caller's closure.
    #[derive(Clone, Copy)]
    struct Job {
        data: *const (),
        call: unsafe fn(*const (), Range<usize>),
        n: usize,
        chunk: usize,
    }

    pub(crate) struct Pool {
        state: AtomicUsize,
        job: UnsafeCell<Job>,
        cursor: AtomicUsize,
        /// Set while the caller is (about to be) parked waiting for the workers inside.
        caller_parked: AtomicBool,
        caller: Mutex<Option<Thread>>,
        workers: OnceLock<Vec<Thread>>,
        /// One call at a time; callers from other threads queue here.
        call: Mutex<()>,
        panicked: AtomicBool,
    }

    // SAFETY: `job` is written only by the caller holding `call` while no worker is inside a
    // call (the previous one closed with count 0), before the new call's state is published
    // (Release); a worker reads it only after joining that state (AcqRel compare-exchange) and
    // before leaving, which the caller waits for before returning.
    unsafe impl Sync for Pool {}

    thread_local! {
        static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The process's pool, started on first use.
    pub(crate) fn get() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::start(candle_core::utils::get_num_threads().max(1) - 1))
    }

    unsafe fn trampoline<F: Fn(Range<usize>) + Sync>(data: *const (), r: Range<usize>) {
        (*(data as *const F))(r)
    }

    impl Pool {
        /// A pool of `workers` threads besides the caller; lives for the process.
        pub(crate) fn start(workers: usize) -> &'static Pool {
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                state: AtomicUsize::new(CLOSED),
                job: UnsafeCell::new(Job {
                    data: std::ptr::null(),
                    call: trampoline::<fn(Range<usize>)>,
                    n: 0,
                    chunk: 1,
                }),
                cursor: AtomicUsize::new(0),
                caller_parked: AtomicBool::new(false),
                caller: Mutex::new(None),
                workers: OnceLock::new(),
                call: Mutex::new(()),
                panicked: AtomicBool::new(false),
            }));
            let threads = (0..workers)
                .filter_map(|i| {
                    std::thread::Builder::new()
                        .name(format!("edgerun-kernels-{i}"))
                        .spawn(move || pool.work())
                        .ok()
                        .map(|h| h.thread().clone())
                })
                .collect();
            let _ = pool.workers.set(threads);
            pool
        }

        /// The caller and the workers.
        pub(crate) fn threads(&self) -> usize {
            self.workers.get().map_or(0, Vec::len) + 1
        }

        /// Runs `f` over `0..n` in chunks on the caller and the workers that join; returns when
        /// all chunks are done. Panics (after every chunk has run) if a chunk panicked.
        pub(crate) fn run<F: Fn(Range<usize>) + Sync>(&self, n: usize, f: &F) {
            if n == 0 {
                return;
            }
            let workers = self.workers.get().map_or(&[][..], Vec::as_slice);
            // From a worker (nested) or without workers: run inline.
            if workers.is_empty() || IN_POOL.with(|c| c.get()) {
                f(0..n);
                return;
            }
            let _guard = self.call.lock().unwrap_or_else(|e| e.into_inner());
            // ~8 grabs per thread: little cursor contention, a small tail.
            let chunk = n.div_ceil((workers.len() + 1) * 8).max(1);
            // SAFETY: see `unsafe impl Sync`: the previous call closed with no worker inside.
            unsafe {
                *self.job.get() = Job {
                    data: f as *const F as *const (),
                    call: trampoline::<F>,
                    n,
                    chunk,
                };
            }
            self.cursor.store(0, Relaxed);
            *self.caller.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
            let generation = (self.state.load(Relaxed) >> GEN_SHIFT).wrapping_add(1);
            self.state.store(generation << GEN_SHIFT, Release);
            for w in workers {
                // Cheap when the worker is spinning (it only leaves a token).
                w.unpark();
            }
            let caller_ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                let start = self.cursor.fetch_add(chunk, Relaxed);
                if start >= n {
                    return;
                }
                f(start..n.min(start + chunk));
            }));
            // Every chunk is taken: no worker may join any more; wait for those inside.
            self.state.fetch_or(CLOSED, AcqRel);
            self.wait_for_workers();
            if let Err(payload) = caller_ok {
                std::panic::resume_unwind(payload);
            }
            if self.panicked.swap(false, Relaxed) {
                panic!("a kernel chunk panicked on a pool worker");
            }
        }

        fn wait_for_workers(&self) {
            let began = Instant::now();
            let mut spins = 0u32;
            while self.state.load(Acquire) & COUNT != 0 {
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(64) || began.elapsed() < CALLER_SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                self.caller_parked.store(true, SeqCst);
                if self.state.load(SeqCst) & COUNT != 0 {
                    std::thread::park();
                }
                self.caller_parked.store(false, SeqCst);
            }
        }

        fn work(&'static self) {
            IN_POOL.with(|c| c.set(true));
            let mut seen = 0usize;
            loop {
                // Wait for a call newer than the last one seen.
                let began = Instant::now();
                let mut spins = 0u32;
                let mut state = self.state.load(Acquire);
                while state >> GEN_SHIFT == seen {
                    spins = spins.wrapping_add(1);
                    if !spins.is_multiple_of(64) || began.elapsed() < WORKER_SPIN {
                        std::hint::spin_loop();
                    } else {
                        // The caller unparks every worker after publishing a call, so one
                        // published after the load above leaves a token.
                        std::thread::park();
                    }
                    state = self.state.load(Acquire);
                }
                seen = state >> GEN_SHIFT;
                // Join it while it is open.
                let joined = loop {
                    if state & CLOSED != 0 || state >> GEN_SHIFT != seen {
                        break false;
                    }
                    match self
                        .state
                        .compare_exchange_weak(state, state + 1, AcqRel, Acquire)
                    {
                        Ok(_) => break true,
                        Err(now) => state = now,
                    }
                };
                if !joined {
                    continue;
                }
                // SAFETY: see `unsafe impl Sync`.
                let job = unsafe { *self.job.get() };
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                    let start = self.cursor.fetch_add(job.chunk, Relaxed);
                    if start >= job.n {
                        return;
                    }
                    // SAFETY: `data` points at the caller's closure, alive until every
                    // worker inside has left.
                    unsafe { (job.call)(job.data, start..job.n.min(start + job.chunk)) };
                }));
                if ran.is_err() {
                    self.panicked.store(true, Relaxed);
                }
                let before = self.state.fetch_sub(1, SeqCst);
                if before & COUNT == 1 && before & CLOSED != 0 && self.caller_parked.load(SeqCst) {
                    if let Some(t) = &*self.caller.lock().unwrap_or_else(|e| e.into_inner()) {
                        t.unpark();
                    }
                }
            }
        }
    }
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

    /// Every index is run exactly once per call, by the caller and the workers, across many
    /// calls of every size, from several threads at once.
    #[test]
    fn the_pool_runs_every_chunk_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let pool = pool::Pool::start(3);
        std::thread::scope(|s| {
            for t in 0..3 {
                s.spawn(move || {
                    for n in (0..300).chain([10_000]) {
                        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                        pool.run(n, &|r: std::ops::Range<usize>| {
                            for i in r {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "{t} {n}"
                        );
                    }
                });
            }
        });
    }

    /// A chunk that panics, on the caller or on a worker, panics the call after every other
    /// chunk ran, and the pool keeps working.
    #[test]
    fn a_panicking_chunk_fails_its_call_only() {
        let pool = pool::Pool::start(2);
        for bad in [0usize, 63] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.run(64, &|r: std::ops::Range<usize>| {
                    assert!(!r.contains(&bad), "chunk {r:?}");
                })
            }));
            assert!(r.is_err());
            let sum = std::sync::atomic::AtomicUsize::new(0);
            pool.run(100, &|r: std::ops::Range<usize>| {
                sum.fetch_add(r.sum::<usize>(), std::sync::atomic::Ordering::Relaxed);
            });
            assert_eq!(sum.into_inner(), 4950);
        }
    }

    /// Idle workers park after spinning, and a call wakes them.
    #[test]
    fn parked_workers_wake_for_a_call() {
        let pool = pool::Pool::start(2);
        for _ in 0..3 {
            std::thread::sleep(pool::WORKER_SPIN * 4);
            let sum = std::sync::atomic::AtomicUsize::new(0);
            pool.run(1000, &|r: std::ops::Range<usize>| {
                sum.fetch_add(r.len(), std::sync::atomic::Ordering::Relaxed);
            });
            assert_eq!(sum.into_inner(), 1000);
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
