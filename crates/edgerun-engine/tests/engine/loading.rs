//! Loading is strict: the architecture is chosen by `general.architecture`, and a tensor or key
//! that is present but unreadable is an error naming it, never a silent fallback. Uses tiny
//! generated GGUFs (random f32 weights in llama's layout), no real model.

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use edgerun_engine::{models, CausalLm, EngineError, Kernels, KvCache, Segment};
use std::path::{Path, PathBuf};

const DIM: usize = 32;
const FF: usize = 64;
const VOCAB: usize = 40;
const HEADS: usize = 4;

fn tensor(shape: &[usize], seed: u64) -> QTensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    QTensor::quantize(
        &Tensor::from_vec(data, shape, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap()
}

/// What to put in a generated file.
struct Spec {
    architecture: &'static str,
    /// Tensors appended after the model's own, in this order (the last one is what a
    /// truncated file loses).
    extra: Vec<(&'static str, QTensor)>,
    /// Replaces `llama.rope.freq_base` with a string.
    bad_freq_base: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            architecture: "llama",
            extra: Vec::new(),
            bad_freq_base: false,
        }
    }
}

fn write(name: &str, spec: Spec) -> PathBuf {
    use gguf_file::Value;
    let dir = std::env::temp_dir().join(format!("edgerun-loading-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let arch = spec.architecture;
    let k = |key: &str| format!("{arch}.{key}");
    let freq_base = if spec.bad_freq_base {
        Value::String("ten thousand".into())
    } else {
        Value::F32(10_000.0)
    };
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("embedding_length"), Value::U32(DIM as u32)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("block_count"), Value::U32(1)),
        (k("context_length"), Value::U32(64)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(2)),
        (k("rope.freq_base"), freq_base),
    ];
    let kv = DIM / HEADS * 2;
    let mut tensors: Vec<(&str, QTensor)> = vec![
        ("token_embd.weight", tensor(&[VOCAB, DIM], 1)),
        ("output_norm.weight", tensor(&[DIM], 2)),
        ("blk.0.attn_norm.weight", tensor(&[DIM], 3)),
        ("blk.0.ffn_norm.weight", tensor(&[DIM], 4)),
        ("blk.0.attn_q.weight", tensor(&[DIM, DIM], 5)),
        ("blk.0.attn_k.weight", tensor(&[kv, DIM], 6)),
        ("blk.0.attn_v.weight", tensor(&[kv, DIM], 7)),
        ("blk.0.attn_output.weight", tensor(&[DIM, DIM], 8)),
        ("blk.0.ffn_gate.weight", tensor(&[FF, DIM], 9)),
        ("blk.0.ffn_up.weight", tensor(&[FF, DIM], 10)),
        ("blk.0.ffn_down.weight", tensor(&[DIM, FF], 11)),
    ];
    tensors.extend(spec.extra);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

/// Cuts the file one byte into `name`'s data (the last tensor written), so the file still
/// names it but it cannot be read.
fn cut_into(path: &Path, name: &str) {
    let ct = gguf_file::Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
    let start = ct.tensor_data_offset + ct.tensor_infos[name].offset;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(start + 1).unwrap();
}

fn load(path: &Path) -> Result<Box<dyn CausalLm>, EngineError> {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    models::load(&ct, &mut f, &Device::Cpu, Kernels::Fastest)
}

fn load_error(path: &Path) -> String {
    match load(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_generated_llama_loads_and_runs_with_tied_embeddings() {
    let model = load(&write("tied", Spec::default())).unwrap();
    assert_eq!(model.config().architecture, "llama");
    let mut cache = KvCache::new(&model.kv_layout(), 8, model.device()).unwrap();
    let mut segs = [Segment {
        tokens: &[1, 2, 3],
        cache: &mut cache,
    }];
    let logits = model.forward(&mut segs, &[0]).unwrap().unwrap();
    assert_eq!(logits.dims(), &[1, VOCAB]);
    assert_eq!(cache.len(), 3);
}

#[test]
fn an_unknown_architecture_is_refused_naming_what_runs() {
    let e = load_error(&write(
        "gemma",
        Spec {
            architecture: "gemma3",
            ..Spec::default()
        },
    ));
    assert!(
        e.contains("`gemma3`") && e.contains("llama"),
        "unexpected error: {e}"
    );
}

#[test]
fn an_unreadable_output_weight_is_an_error_not_tied_embeddings() {
    let path = write(
        "bad-output",
        Spec {
            extra: vec![("output.weight", tensor(&[VOCAB, DIM], 12))],
            ..Spec::default()
        },
    );
    // Whole, it loads (and uses its own output matrix).
    load(&path).unwrap();
    cut_into(&path, "output.weight");
    let e = load_error(&path);
    assert!(e.contains("output.weight"), "unexpected error: {e}");
}

#[test]
fn an_unreadable_or_malformed_rope_freqs_is_an_error_not_no_scaling() {
    let half = DIM / HEADS / 2;
    let path = write(
        "bad-rope",
        Spec {
            extra: vec![("rope_freqs.weight", tensor(&[half], 13))],
            ..Spec::default()
        },
    );
    load(&path).unwrap();
    cut_into(&path, "rope_freqs.weight");
    let e = load_error(&path);
    assert!(e.contains("rope_freqs.weight"), "unexpected error: {e}");
    // Readable but the wrong length.
    let e = load_error(&write(
        "short-rope",
        Spec {
            extra: vec![("rope_freqs.weight", tensor(&[half - 1], 14))],
            ..Spec::default()
        },
    ));
    assert!(e.contains("rope_freqs"), "unexpected error: {e}");
}

#[test]
fn a_metadata_key_of_the_wrong_type_is_an_error_not_its_default() {
    let e = load_error(&write(
        "bad-meta",
        Spec {
            bad_freq_base: true,
            ..Spec::default()
        },
    ));
    assert!(e.contains("llama.rope.freq_base"), "unexpected error: {e}");
}

#[test]
fn qwen2_needs_its_biases_in_their_shapes_and_reads_its_own_keys() {
    let kv = DIM / HEADS * 2;
    let biases = |q: usize| {
        vec![
            ("blk.0.attn_q.bias", tensor(&[q], 15)),
            ("blk.0.attn_k.bias", tensor(&[kv], 16)),
            ("blk.0.attn_v.bias", tensor(&[kv], 17)),
        ]
    };
    let qwen2 = |name: &str, extra| {
        write(
            name,
            Spec {
                architecture: "qwen2",
                extra,
                ..Spec::default()
            },
        )
    };
    let model = load(&qwen2("qwen2", biases(DIM))).unwrap();
    assert_eq!(model.config().architecture, "qwen2");
    let mut cache = KvCache::new(&model.kv_layout(), 8, model.device()).unwrap();
    let mut segs = [Segment {
        tokens: &[1, 2, 3],
        cache: &mut cache,
    }];
    assert_eq!(
        model.forward(&mut segs, &[0]).unwrap().unwrap().dims(),
        &[1, VOCAB]
    );
    let e = load_error(&qwen2("qwen2-no-bias", Vec::new()));
    assert!(e.contains("blk.0.attn_q.bias"), "unexpected error: {e}");
    let e = load_error(&qwen2("qwen2-short-bias", biases(DIM - 1)));
    assert!(
        e.contains("blk.0.attn_q.bias") && e.contains("expected"),
        "unexpected error: {e}"
    );
    let path = qwen2("qwen2-cut", biases(DIM));
    cut_into(&path, "blk.0.attn_v.bias");
    let e = load_error(&path);
    assert!(e.contains("blk.0.attn_v.bias"), "unexpected error: {e}");
}
