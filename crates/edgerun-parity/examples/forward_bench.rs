//! Times the raw forward pass (no scheduler, no HTTP) against candle-transformers'
//! quantized_llama on the same GGUF: prefill of a prompt, then greedy decode steps.
//!
//! cargo run --release -p edgerun-parity --example forward_bench -- <model.gguf> [prompt_tokens] [decode_steps]

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use edgerun_engine::{argmax, KvCache, LoadedModel, Segment};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let n_prompt: usize = args.get(2).map_or(30, |s| s.parse().unwrap());
    let n_decode: usize = args.get(3).map_or(100, |s| s.parse().unwrap());
    let loaded = LoadedModel::load(&path, None, &Device::Cpu).unwrap();
    let mut prompt = loaded
        .tokenizer
        .encode(&"The history of Paris is long and interesting. ".repeat(20))
        .unwrap();
    prompt.truncate(n_prompt);
    let model = &loaded.model;

    for round in 0..3 {
        // edgerun
        let mut cache =
            KvCache::new(&model.kv_layout(), n_prompt + n_decode, model.device()).unwrap();
        let t = Instant::now();
        let mut segs = [Segment {
            tokens: &prompt,
            cache: &mut cache,
        }];
        let logits = model.forward(&mut segs, &[0]).unwrap().unwrap();
        let prefill = t.elapsed();
        let mut tok = argmax(&logits.to_vec2::<f32>().unwrap()[0]);
        let t = Instant::now();
        for _ in 0..n_decode {
            let input = [tok];
            let mut segs = [Segment {
                tokens: &input,
                cache: &mut cache,
            }];
            let logits = model.forward(&mut segs, &[0]).unwrap().unwrap();
            tok = argmax(&logits.to_vec2::<f32>().unwrap()[0]);
        }
        let decode = t.elapsed();

        // reference
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        let t = Instant::now();
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = reference.forward(&input, 0).unwrap();
        let rprefill = t.elapsed();
        let mut tok = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        let t = Instant::now();
        for i in 0..n_decode {
            let input = Tensor::new(&[tok], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = reference.forward(&input, n_prompt + i).unwrap();
            tok = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        }
        let rdecode = t.elapsed();
        println!(
            "round {round}: edgerun prefill {:.1} tok/s decode {:.1} tok/s | quantized_llama prefill {:.1} tok/s decode {:.1} tok/s",
            n_prompt as f64 / prefill.as_secs_f64(),
            n_decode as f64 / decode.as_secs_f64(),
            n_prompt as f64 / rprefill.as_secs_f64(),
            n_decode as f64 / rdecode.as_secs_f64(),
        );
    }
}
