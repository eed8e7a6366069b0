//! Times edgerun's Q4_1 matmul kernel against candle's `QMatMul::forward` (scalar Q4_1 x Q8_1)
//! on the same random weights and inputs: median time per call, both through the Tensor API.
//!
//! cargo run --release -p edgerun-engine --example kernel_bench [-- <ms per measurement> [NxK] [m]]
//!
//! The optional `NxK` and `m` restrict the run to one shape / pick the batch size. Instead of a
//! shape, `cold [m]` streams 80 distinct 1536x576 matrices (44 MB, past the L3) like a decode
//! step, `model=<file.gguf> [m]` runs every Q4_1 weight of a model once (checking ours
//! against candle), `q8_0 [m]` times the Q8_0 kernel on SmolLM2's tied output layer
//! (49152x576) `q6_k [m]` the Q6_K kernel (tiled; `q6_k_in_place [m]`: the in-place one) on Llama-3-mini's output layer (128256x1024) `q4_k [m]` / `q5_k [m]`
//! the Q4_K (tiled; `q4_k_in_place [m]`: the in-place kernel) / Q5_K kernel on Llama-3-8B's ffn_up (14336x4096); `candle=<Q4K|Q5K|Q6K|Q8_0> NxK` times candle's own kernel for a format (no kernel
//! of ours yet) at m = 1, 2, 4, 8, 32, with its effective bandwidth. Thread count:
//! CANDLE_NUM_THREADS (candle's pool, and the size of our kernels' own pool, `kernels/cpu.rs`).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use edgerun_engine::kernels::{
    Q4KMatrix, Q4KTiled, Q4_1Matrix, Q5KMatrix, Q6KMatrix, Q6KTiled, Q8_0Matrix,
};
use std::time::{Duration, Instant};

fn lcg(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// (median, minimum) seconds per call of `f`, sampled for about `budget`.
fn timings(budget: Duration, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 5 || (start.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], times[0])
}

/// Decode-like run: `m` rows (default 1) through `count` distinct 1536x576 matrices (more than
/// the L3 holds), so the weights come from DRAM as in a real forward pass. Prints time per matrix.
fn cold(budget: Duration, m: usize) {
    let (n, k, count) = (1536, 576, 80);
    let mut ours = Vec::new();
    let mut candle = Vec::new();
    for i in 0..count {
        let w = Tensor::from_vec(lcg(i as u64, n * k), (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        ours.push(Q4_1Matrix::from_qtensor(&qt).unwrap().unwrap());
        candle.push(QMatMul::from_qtensor(qt).unwrap());
    }
    let x = Tensor::from_vec(lcg(99, m * k), (m, k), &Device::Cpu).unwrap();
    let t_candle = timings(budget, || {
        for c in &candle {
            std::hint::black_box(c.forward(&x).unwrap());
        }
    })
    .0 / count as f64;
    let t_ours = timings(budget, || {
        for o in &ours {
            std::hint::black_box(o.forward(&x).unwrap());
        }
    })
    .0 / count as f64;
    let bytes = (n * k / 32 * 20) as f64;
    println!(
        "cold m={m}, {count} x {n}x{k} ({:.0} MB of weights): candle {:.1} us ({:.1} GB/s), \
         ours {:.1} us ({:.1} GB/s), {:.2}x",
        bytes * count as f64 / 1e6,
        t_candle * 1e6,
        bytes / t_candle / 1e9,
        t_ours * 1e6,
        bytes / t_ours / 1e9,
        t_candle / t_ours
    );
}

/// Every 2-D Q4_1 weight of a GGUF model, `m` rows through each (a decode step's matmuls when
/// m = 1): checks ours against candle and prints the total time per pass for both.
fn model(path: &str, budget: Duration, m: usize) {
    use candle_core::quantized::gguf_file;
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<_> = content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut pairs = Vec::new();
    let mut bytes = 0usize;
    let mut max_rel = 0f32;
    for name in names {
        let qt = content.tensor(&mut file, &name, &Device::Cpu).unwrap();
        let Some(ours) = Q4_1Matrix::from_qtensor(&qt).unwrap() else {
            continue;
        };
        bytes += qt.storage_size_in_bytes();
        let x = Tensor::from_vec(
            lcg(bytes as u64, m * ours.cols()),
            (m, ours.cols()),
            &Device::Cpu,
        )
        .unwrap();
        let candle = QMatMul::from_qtensor(qt).unwrap();
        let want = candle.forward(&x).unwrap();
        let got = ours.forward(&x).unwrap();
        let max_ref: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let diff: f32 = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        max_rel = max_rel.max(diff / max_ref);
        pairs.push((ours, candle, x));
    }
    let t_candle = timings(budget, || {
        for (_, c, x) in &pairs {
            std::hint::black_box(c.forward(x).unwrap());
        }
    })
    .0;
    let t_ours = timings(budget, || {
        for (o, _, x) in &pairs {
            std::hint::black_box(o.forward(x).unwrap());
        }
    })
    .0;
    println!(
        "{} Q4_1 matrices ({:.1} MB), m={m}: candle {:.2} ms, ours {:.2} ms ({:.1} GB/s), \
         {:.2}x; max |diff| / max |ref| = {:.1e}",
        pairs.len(),
        bytes as f64 / 1e6,
        t_candle * 1e3,
        t_ours * 1e3,
        bytes as f64 / t_ours / 1e9,
        t_candle / t_ours,
        max_rel
    );
}

/// Our Q8_0 (SmolLM2's tied output layer, 49152x576) or Q6_K (Llama-3-mini's output layer,
/// 128256x1024) kernel against candle's, at several batch sizes.
fn ours_vs_candle(budget: Duration, dtype: GgmlDType, only_m: Option<usize>, in_place: bool) {
    let (n, k) = match dtype {
        GgmlDType::Q8_0 => (49152, 576),
        // Llama-3-8B's ffn_up / ffn_gate.
        GgmlDType::Q4K | GgmlDType::Q5K => (14336, 4096),
        _ => (128256, 1024),
    };
    let w = Tensor::from_vec(lcg(3, n * k), (n, k), &Device::Cpu).unwrap();
    let qt = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
    let bytes = qt.storage_size_in_bytes() as f64;
    let ours: Box<dyn Fn(&Tensor) -> Tensor> = match dtype {
        GgmlDType::Q8_0 => {
            let m = Q8_0Matrix::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
        GgmlDType::Q4K if in_place => {
            let m = Q4KMatrix::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
        GgmlDType::Q4K => {
            let m = Q4KTiled::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
        GgmlDType::Q5K => {
            let m = Q5KMatrix::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
        _ if in_place => {
            let m = Q6KMatrix::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
        _ => {
            let m = Q6KTiled::from_qtensor(&qt).unwrap().unwrap();
            Box::new(move |x| m.forward(x).unwrap())
        }
    };
    let candle = QMatMul::from_arc(qt).unwrap();
    for m in only_m.map_or(vec![1usize, 2, 4, 8, 32, 128], |m| vec![m]) {
        let x = Tensor::from_vec(lcg(m as u64, m * k), (m, k), &Device::Cpu).unwrap();
        let t_candle = timings(budget, || {
            std::hint::black_box(candle.forward(&x).unwrap());
        })
        .0;
        let t_ours = timings(budget, || {
            std::hint::black_box(ours(&x));
        })
        .0;
        println!(
            "{dtype:?} {n}x{k} m={m}: candle {:.2} ms ({:.1} GB/s), ours {:.2} ms ({:.1} GB/s), {:.2}x",
            t_candle * 1e3,
            bytes / t_candle / 1e9,
            t_ours * 1e3,
            bytes / t_ours / 1e9,
            t_candle / t_ours
        );
    }
}

/// Candle's kernel alone for `dtype`, for formats we have no kernel of our own for yet.
fn candle_only(budget: Duration, dtype: &str, shape: Option<&str>) {
    let dtype = match dtype {
        "Q4K" => GgmlDType::Q4K,
        "Q5K" => GgmlDType::Q5K,
        "Q6K" => GgmlDType::Q6K,
        "Q8_0" => GgmlDType::Q8_0,
        other => panic!("unknown dtype {other}"),
    };
    let (n, k) = shape
        .and_then(|s| s.split_once('x'))
        .map_or((4096, 1024), |(n, k)| {
            (n.parse().unwrap(), k.parse().unwrap())
        });
    let w = Tensor::from_vec(lcg(5, n * k), (n, k), &Device::Cpu).unwrap();
    let qt = QTensor::quantize(&w, dtype).unwrap();
    let bytes = qt.storage_size_in_bytes() as f64;
    let candle = QMatMul::from_qtensor(qt).unwrap();
    for m in [1usize, 2, 4, 8, 32] {
        let x = Tensor::from_vec(lcg(m as u64, m * k), (m, k), &Device::Cpu).unwrap();
        let t = timings(budget, || {
            std::hint::black_box(candle.forward(&x).unwrap());
        })
        .0;
        println!(
            "candle {dtype:?} {n}x{k} m={m}: {:.3} ms ({:.1} GB/s)",
            t * 1e3,
            bytes / t / 1e9
        );
    }
}

fn main() {
    let budget_ms: u64 = std::env::args().nth(1).map_or(400, |s| s.parse().unwrap());
    let budget = Duration::from_millis(budget_ms);
    let only_shape = std::env::args().nth(2);
    if let Some(dtype) = only_shape
        .as_deref()
        .and_then(|s| s.strip_prefix("candle="))
    {
        candle_only(budget, dtype, std::env::args().nth(3).as_deref());
        return;
    }
    let only_m: Option<usize> = std::env::args().nth(3).map(|s| s.parse().unwrap());
    if let Some(path) = only_shape.as_deref().and_then(|s| s.strip_prefix("model=")) {
        model(path, budget, only_m.unwrap_or(1));
        return;
    }
    if only_shape.as_deref() == Some("q8_0") {
        ours_vs_candle(budget, GgmlDType::Q8_0, only_m, true);
        return;
    }
    if only_shape.as_deref() == Some("q4_k") {
        ours_vs_candle(budget, GgmlDType::Q4K, only_m, false);
        return;
    }
    if only_shape.as_deref() == Some("q4_k_in_place") {
        ours_vs_candle(budget, GgmlDType::Q4K, only_m, true);
        return;
    }
    if only_shape.as_deref() == Some("q5_k") {
        ours_vs_candle(budget, GgmlDType::Q5K, only_m, true);
        return;
    }
    if only_shape.as_deref() == Some("q6_k") {
        ours_vs_candle(budget, GgmlDType::Q6K, only_m, false);
        return;
    }
    if only_shape.as_deref() == Some("q6_k_in_place") {
        ours_vs_candle(budget, GgmlDType::Q6K, only_m, true);
        return;
    }
    if only_shape.as_deref() == Some("cold") {
        cold(budget, only_m.unwrap_or(1));
        return;
    }
    println!(
        "threads: {}",
        candle_core::utils::barrier_pool().n_workers() + 1
    );
    println!(
        "{:>10} {:>4} {:>12} {:>12} {:>8} {:>9} {:>10} {:>10} {:>8}",
        "n x k",
        "m",
        "candle (us)",
        "ours (us)",
        "speedup",
        "ours GB/s",
        "candle min",
        "ours min",
        "min spdup"
    );
    for (n, k) in [(1536, 576), (576, 1536), (576, 576), (192, 576)] {
        if only_shape
            .as_ref()
            .is_some_and(|s| *s != format!("{n}x{k}"))
        {
            continue;
        }
        let w =
            Tensor::from_vec(lcg(n as u64 * 7 + k as u64, n * k), (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q4_1Matrix::from_qtensor(&qt).unwrap().unwrap();
        let candle = QMatMul::from_qtensor(qt).unwrap();
        for m in only_m.map_or(vec![1usize, 4, 30, 128], |m| vec![m]) {
            let x = Tensor::from_vec(lcg(m as u64, m * k), (m, k), &Device::Cpu).unwrap();
            let (t_candle, min_candle) = timings(budget, || {
                std::hint::black_box(candle.forward(&x).unwrap());
            });
            let (t_ours, min_ours) = timings(budget, || {
                std::hint::black_box(ours.forward(&x).unwrap());
            });
            let weight_bytes = (n * k / 32 * 20) as f64;
            println!(
                "{:>10} {:>4} {:>12.1} {:>12.1} {:>7.2}x {:>9.1} {:>10.1} {:>10.1} {:>7.2}x",
                format!("{n}x{k}"),
                m,
                t_candle * 1e6,
                t_ours * 1e6,
                t_candle / t_ours,
                weight_bytes / t_ours / 1e9,
                min_candle * 1e6,
                min_ours * 1e6,
                min_candle / min_ours
            );
        }
    }
}
