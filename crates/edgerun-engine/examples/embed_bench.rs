//! Times the embedding forward pass alone (no HTTP, no batching thread): 256 texts of about 60
//! tokens (`edgerun_testkit::embedding_bench_texts`, as `tests/bench_embed.rs` sends), embedded in batches of `BATCH` texts,
//! and one text at a time. For profiling the encoder (`perf record` this binary).
//!
//! cargo run --release -p edgerun-engine --example embed_bench -- <model dir> [batch] [rounds] [auto|avx2|candle]

use candle_core::Device;
use edgerun_engine::models::bert::BertKernels;
use edgerun_engine::{EmbedInput, EmbeddingModel, Pooling};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: embed_bench <model dir> [batch] [rounds]");
    let batch: usize = args.next().map_or(128, |b| b.parse().unwrap());
    let rounds: usize = args.next().map_or(3, |r| r.parse().unwrap());
    let kernels = match args.next().as_deref() {
        None | Some("auto") => BertKernels::Auto,
        Some("candle") => BertKernels::Candle,
        Some("avx2") => {
            edgerun_engine::kernels::dense_f32::force_avx2(true);
            BertKernels::Auto
        }
        Some(other) => panic!("kernels: auto, avx2 or candle, not {other}"),
    };
    let model =
        EmbeddingModel::load_with(std::path::Path::new(&dir), &Device::Cpu, kernels).unwrap();
    eprintln!("encoder: {}", model.kernels());
    let inputs: Vec<EmbedInput> = edgerun_testkit::embedding_bench_texts(256)
        .into_iter()
        .map(EmbedInput::Text)
        .collect();
    let tokens = model.tokenize(&inputs, false).unwrap();
    let per_text = tokens.iter().map(Vec::len).sum::<usize>() as f64 / tokens.len() as f64;
    for _ in 0..rounds {
        let t = Instant::now();
        for chunk in tokens.chunks(batch) {
            let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            model
                .embed_batch(&rows, &vec![Pooling::Mean; rows.len()])
                .unwrap();
        }
        let all = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for row in tokens.iter().take(16) {
            model.embed_batch(&[row], &[Pooling::Mean]).unwrap();
        }
        let one = t.elapsed().as_secs_f64() / 16.0;
        println!(
            "256 texts ({per_text:.1} tokens each) in batches of {batch}: {:.1} texts/s; one text: {:.2} ms",
            256.0 / all,
            one * 1e3
        );
    }
}
