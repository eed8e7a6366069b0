//! The embedding model (all-MiniLM-L6-v2) against sentence-transformers' own vectors
//! (`tests/data/minilm-reference.json`): every text, alone and batched with the others, cosine
//! ≥ 0.9999; the long ones only with truncation asked for, refused without it. And the
//! batching thread: concurrent jobs, the queue bound, pooling choices.

use edgerun_engine::models::bert::BertKernels;
use edgerun_engine::{EmbedInput, Embedder, EmbeddingConfig, EmbeddingModel, EngineError, Pooling};
use edgerun_testkit::{embedding_model_dir, embedding_reference_path};
use serde_json::Value;

struct Reference {
    text: String,
    tokens: usize,
    truncated: bool,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Reference> {
    let text = std::fs::read_to_string(embedding_reference_path()).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Reference {
            text: e["text"].as_str().unwrap().to_string(),
            tokens: e["tokens"].as_u64().unwrap() as usize,
            truncated: e["truncated"].as_bool().unwrap(),
            embedding: e["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `[CLS]`, 254 × "this", `[SEP]`: an input as long as the model reads.
fn full_window_input() -> Vec<u32> {
    std::iter::once(101)
        .chain(std::iter::repeat_n(2023, 254))
        .chain(std::iter::once(102))
        .collect()
}

fn model() -> EmbeddingModel {
    EmbeddingModel::load(&embedding_model_dir(), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn every_reference_text_matches_sentence_transformers() {
    let model = model();
    let info = model.info().clone();
    assert_eq!(info.dimensions, 384);
    assert_eq!(info.max_tokens, 256);
    assert_eq!(info.pooling, Pooling::Mean);
    assert!(info.normalize);
    let refs = reference();
    assert!(refs.len() >= 50);
    let inputs: Vec<EmbedInput> = refs
        .iter()
        .map(|r| EmbedInput::Text(r.text.clone()))
        .collect();
    let tokens = model.tokenize(&inputs, true).unwrap();
    for (r, t) in refs.iter().zip(&tokens) {
        assert_eq!(t.len(), r.tokens.min(info.max_tokens), "{:?}", r.text);
    }
    // Alone, then all at once (padded to the longest): both match.
    let mut worst = 1.0f64;
    for (r, t) in refs.iter().zip(&tokens) {
        let v = model.embed_batch(&[t], &[Pooling::Mean]).unwrap().remove(0);
        let c = cosine(&v, &r.embedding);
        worst = worst.min(c);
        assert!(c >= 0.9999, "{:?}: cosine {c}", r.text);
    }
    let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let batched = model
        .embed_batch(&rows, &vec![Pooling::Mean; rows.len()])
        .unwrap();
    for (r, v) in refs.iter().zip(&batched) {
        let c = cosine(v, &r.embedding);
        worst = worst.min(c);
        assert!(c >= 0.9999, "{:?} (batched): cosine {c}", r.text);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
    }
    eprintln!("worst cosine against sentence-transformers: {worst:.7}");
}

/// The CPU's own encoder (AVX-512 or AVX2, texts packed without padding) against candle's padded
/// forward, on every reference text batched: the same vectors to float rounding; a text's
/// vector is the same bits alone as batched with the others (no padding, row-invariant), and
/// the same bits from the AVX2 tile as from the AVX-512 one.
#[test]
fn the_cpu_encoder_agrees_with_candles_and_ignores_its_neighbours() {
    let fast = model();
    if fast.kernels() == "candle" {
        eprintln!(
            "skipped: this CPU runs candle's encoder only ({})",
            fast.kernels()
        );
        return;
    }
    let candle = EmbeddingModel::load_with(
        &embedding_model_dir(),
        &candle_core::Device::Cpu,
        BertKernels::Candle,
    )
    .unwrap();
    assert_eq!(candle.kernels(), "candle");
    let refs = reference();
    let inputs: Vec<EmbedInput> = refs
        .iter()
        .map(|r| EmbedInput::Text(r.text.clone()))
        .collect();
    let tokens = fast.tokenize(&inputs, true).unwrap();
    let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let poolings = vec![pooling; rows.len()];
        let a = fast.embed_batch(&rows, &poolings).unwrap();
        let b = candle.embed_batch(&rows, &poolings).unwrap();
        let mut worst = 1.0f64;
        for (x, y) in a.iter().zip(&b) {
            worst = worst.min(cosine(x, y));
        }
        assert!(worst >= 0.999_999, "{pooling:?}: worst cosine {worst}");
        for (i, row) in rows.iter().enumerate().step_by(7) {
            let alone = fast.embed_batch(&[row], &[pooling]).unwrap().remove(0);
            assert_eq!(alone, a[i], "text {i} alone and batched ({pooling:?})");
        }
        // The AVX2 tile (forced where the CPU has AVX-512) gives the same bits.
        edgerun_engine::kernels::dense_f32::force_avx2(true);
        let narrow = fast.embed_batch(&rows, &poolings);
        edgerun_engine::kernels::dense_f32::force_avx2(false);
        assert!(
            narrow.unwrap() == a,
            "the AVX2 tile's vectors differ ({pooling:?})"
        );
    }
}

#[test]
fn long_texts_are_refused_unless_truncation_is_asked_for() {
    let model = model();
    let long = reference().into_iter().find(|r| r.truncated).unwrap();
    let err = model
        .tokenize(&[EmbedInput::Text(long.text.clone())], false)
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidRequest(m) if m.contains("at most 256")),
        "{err}"
    );
    let ids = model
        .tokenize(&[EmbedInput::Text(long.text)], true)
        .unwrap();
    assert_eq!(ids[0].len(), 256);
    // Token inputs: used as given, checked against the vocabulary.
    let bad = model.tokenize(&[EmbedInput::Tokens(vec![101, 999_999])], false);
    assert!(matches!(bad, Err(EngineError::InvalidRequest(_))));
    assert!(model
        .tokenize(&[EmbedInput::Tokens(vec![])], false)
        .is_err());
}

#[test]
fn the_batching_thread_answers_concurrent_jobs_like_one_at_a_time() {
    let model = model();
    let refs = reference();
    let embedder = Embedder::start(
        model,
        EmbeddingConfig {
            max_batch_tokens: 512,
            max_queue: 64,
            ..EmbeddingConfig::default()
        },
    )
    .unwrap();
    let jobs: Vec<_> = refs
        .chunks(5)
        .map(|chunk| {
            let inputs: Vec<EmbedInput> = chunk
                .iter()
                .map(|r| EmbedInput::Text(r.text.clone()))
                .collect();
            let tokens = embedder.tokenize(&inputs, true).unwrap();
            (chunk, embedder.submit(tokens, Pooling::Mean).unwrap())
        })
        .collect();
    for (chunk, ticket) in jobs {
        let vectors = ticket.blocking_wait().unwrap();
        assert_eq!(vectors.len(), chunk.len());
        for (r, v) in chunk.iter().zip(&vectors) {
            assert!(cosine(v, &r.embedding) >= 0.9999, "{:?}", r.text);
        }
    }
    let stats = embedder.stats();
    assert_eq!(stats.requests as usize, refs.chunks(5).count());
    assert_eq!(stats.inputs as usize, refs.len());
    assert_eq!(stats.queued_requests, 0);
    assert!(stats.batches >= 2, "{stats:?}");
    // CLS pooling is the first token's vector, normalised: not the mean's.
    let t = embedder
        .tokenize(&[EmbedInput::Text("a cat".into())], false)
        .unwrap();
    let mean = embedder
        .submit(t.clone(), Pooling::Mean)
        .unwrap()
        .blocking_wait()
        .unwrap();
    let cls = embedder
        .submit(t, Pooling::Cls)
        .unwrap()
        .blocking_wait()
        .unwrap();
    assert!(cosine(&mean[0], &cls[0]) < 0.999);
}

#[test]
fn a_full_queue_is_busy_at_once() {
    let embedder = Embedder::start(
        model(),
        EmbeddingConfig {
            max_batch_tokens: 256,
            max_queue: 1,
            ..EmbeddingConfig::default()
        },
    )
    .unwrap();
    let long = full_window_input();
    // Keep the thread busy, then fill the queue's one place: the next submit is Busy.
    let mut tickets = Vec::new();
    let mut busy = false;
    for _ in 0..50 {
        match embedder.submit(vec![long.clone(); 8], Pooling::Mean) {
            Ok(t) => tickets.push(t),
            Err(EngineError::Busy) => {
                busy = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy, "50 jobs were accepted with a queue of 1");
    for t in tickets {
        assert_eq!(t.blocking_wait().unwrap().len(), 8);
    }
    assert!(Embedder::start(
        model(),
        EmbeddingConfig {
            max_batch_tokens: 100,
            max_queue: 1,
            ..EmbeddingConfig::default()
        }
    )
    .is_err());
}

#[test]
fn a_job_whose_caller_left_is_not_computed() {
    let embedder = Embedder::start(
        model(),
        EmbeddingConfig {
            max_batch_tokens: 1024,
            max_queue: 4,
            ..EmbeddingConfig::default()
        },
    )
    .unwrap();
    let long = full_window_input();
    // 64 inputs of 256 tokens: 16 forward passes of 4 if anyone waited for them.
    let abandoned = embedder.submit(vec![long; 64], Pooling::Mean).unwrap();
    drop(abandoned);
    let after = embedder
        .submit(vec![vec![101, 7592, 102]], Pooling::Mean)
        .unwrap()
        .blocking_wait()
        .unwrap();
    assert_eq!(after.len(), 1);
    let stats = embedder.stats();
    assert!(stats.batches <= 3, "{stats:?}");
    assert_eq!(stats.queued_requests, 0, "{stats:?}");
    assert!(embedder.is_running());
    // More tokens than one request may hold: refused before it queues.
    let over = embedder.submit(vec![full_window_input(); 257], Pooling::Mean);
    assert!(
        matches!(&over, Err(EngineError::InvalidRequest(m)) if m.contains("at most 65536")),
        "{:?}",
        over.as_ref().err()
    );
}
