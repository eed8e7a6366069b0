//! (b)-(d): continuous batching must not change what any sequence generates.

use crate::harness;

use edgerun_engine::{
    Engine, GenerationEvent, GenerationRequest, QueuePolicy, SamplingConfig, SchedulerConfig,
    StopCriteria, TokenStream,
};

const PROMPTS: [&str; 4] = [
    "Write a haiku about the sea.",
    "What is 17 times 3? Explain briefly.",
    "List three colours of the rainbow, then describe each one in a sentence.",
    "Tell me a very short story about a robot who learns to paint.",
];

/// What a test asks of one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    max_tokens: usize,
    sampling: SamplingConfig,
}

fn greedy(max_tokens: usize) -> Params {
    Params {
        max_tokens,
        sampling: SamplingConfig::GREEDY,
    }
}

fn request(engine: &Engine, prompt: &str, params: Params) -> GenerationRequest {
    let input = edgerun_engine::PromptInput::Prompt {
        text: prompt.to_string(),
        raw: false,
    };
    GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling: params.sampling,
        stopping: StopCriteria::max_tokens(params.max_tokens),
        constraint: edgerun_engine::Constraint::Free,
    }
}

fn submit(engine: &Engine, prompt: &str, params: Params) -> TokenStream {
    engine
        .submit(request(engine, prompt, params), QueuePolicy::Wait)
        .unwrap()
}

fn alone(engine: &Engine, params: &[Params]) -> Vec<(String, usize)> {
    PROMPTS
        .iter()
        .zip(params)
        .map(|(p, &params)| harness::collect(submit(engine, p, params)))
        .collect()
}

fn together(engine: &Engine, params: &[Params]) -> Vec<(String, usize)> {
    let streams: Vec<_> = PROMPTS
        .iter()
        .zip(params)
        .map(|(p, &params)| submit(engine, p, params))
        .collect();
    streams.into_iter().map(harness::collect).collect()
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        // Small chunks so that prompts are still being read while others decode.
        prefill_chunk: 8,
        ..SchedulerConfig::default()
    }
}

#[test]
fn greedy_batch_equals_each_alone() {
    let engine = harness::engine(config());
    let params = [greedy(40); 4];
    let solo = alone(&engine, &params);
    assert_eq!(engine.stats().peak_batch_size, 1);
    let batch = together(&engine, &params);
    assert_eq!(
        engine.stats().peak_batch_size,
        4,
        "the four prompts never ran in one step"
    );
    for (i, (a, b)) in solo.iter().zip(&batch).enumerate() {
        assert!(!a.0.is_empty(), "prompt {i} generated nothing");
        assert_eq!(a, b, "prompt {i} differs in a batch");
    }
    // Four different prompts give four different answers (the batch is not one sequence x4).
    let mut texts: Vec<_> = batch.iter().map(|b| &b.0).collect();
    texts.dedup();
    assert_eq!(texts.len(), 4);
}

#[test]
fn seeded_sampling_is_reproducible_alone_and_in_a_batch() {
    let engine = harness::engine(config());
    let params: Vec<_> = (0..4)
        .map(|i| Params {
            max_tokens: 30,
            sampling: SamplingConfig {
                temperature: 0.9,
                top_p: 0.95,
                top_k: 40,
                seed: 1234 + i,
                ..SamplingConfig::default()
            },
        })
        .collect();
    let first = alone(&engine, &params);
    let second = alone(&engine, &params);
    assert_eq!(first, second, "same seed alone must give the same text");
    let batch = together(&engine, &params);
    assert_eq!(first, batch, "same seed in a batch must give the same text");
    // A different seed gives a different sample for at least one prompt.
    let other: Vec<_> = params
        .iter()
        .map(|p| Params {
            sampling: SamplingConfig {
                seed: p.sampling.seed + 100,
                ..p.sampling
            },
            ..*p
        })
        .collect();
    assert_ne!(first, alone(&engine, &other));
}

#[test]
fn cancelling_one_sequence_leaves_the_others_unchanged() {
    let engine = harness::engine(config());
    let params = [greedy(40); 4];
    let solo = alone(&engine, &params);

    let mut streams: Vec<Option<TokenStream>> = PROMPTS
        .iter()
        .map(|p| Some(submit(&engine, p, greedy(40))))
        .collect();
    // Let the victim produce a couple of tokens, then drop it mid-generation.
    let mut victim = streams[1].take().unwrap();
    let mut seen = 0;
    while seen < 2 {
        match victim.blocking_recv() {
            Some(GenerationEvent::Token { .. }) => seen += 1,
            Some(GenerationEvent::Finished { .. }) | None => panic!("victim finished early"),
            _ => {}
        }
    }
    drop(victim);
    for (i, s) in streams.into_iter().enumerate() {
        if let Some(s) = s {
            assert_eq!(
                harness::collect(s),
                solo[i],
                "prompt {i} changed after a cancellation"
            );
        }
    }
    let stats = engine.stats();
    assert_eq!(stats.active_sequences, 0);
    assert_eq!(stats.queued_requests, 0);
    assert!(stats.requests_cancelled_total >= 1, "{stats:?}");
}

#[test]
fn cancelling_during_prefill_frees_the_sequence() {
    let engine = harness::engine(SchedulerConfig {
        prefill_chunk: 4,
        ..SchedulerConfig::default()
    });
    let long = "word ".repeat(600);
    let stream = submit(&engine, &long, greedy(5));
    // Wait until the engine has started reading it, then drop it.
    let started = std::time::Instant::now();
    while engine.stats().active_sequences == 0 {
        assert!(started.elapsed().as_secs() < 30);
        std::thread::yield_now();
    }
    drop(stream);
    let started = std::time::Instant::now();
    while engine.stats().active_sequences != 0 {
        assert!(
            started.elapsed().as_secs() < 5,
            "sequence not freed while prefilling"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Its prompt was never finished: only the warm-up prompt has been counted.
    assert!(
        engine.stats().prompt_tokens_total < 100,
        "{:?}",
        engine.stats()
    );
    // The engine still serves.
    let (_, n) = harness::collect(submit(&engine, "Hi", greedy(3)));
    assert!(n >= 1);
}

#[test]
fn kv_cache_budget_queues_what_does_not_fit_and_refuses_what_never_will() {
    let loaded = harness::load();
    let per_token = loaded.model.kv_layout().bytes_per_position();
    let engine = Engine::start(
        loaded,
        SchedulerConfig {
            // Room for one sequence of 150 positions at a time.
            kv_cache_budget: Some(150 * per_token),
            ..SchedulerConfig::default()
        },
        None,
    )
    .unwrap();
    let a = submit(&engine, PROMPTS[0], greedy(100));
    let b = submit(&engine, PROMPTS[1], greedy(100));
    let (ta, _) = harness::collect(a);
    let (tb, _) = harness::collect(b);
    assert!(!ta.is_empty() && !tb.is_empty());
    assert_eq!(
        engine.stats().peak_batch_size,
        1,
        "both ran at once over budget"
    );
    assert_eq!(engine.stats().kv_cache_reserved_bytes, 0);

    match engine.submit(request(&engine, PROMPTS[0], greedy(200)), QueuePolicy::Wait) {
        Err(edgerun_engine::EngineError::KvCacheBudgetExceeded { .. }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a request over the KV budget was accepted"),
    }
}

/// Sixteen sequences sampling at random in one step are sampled on several threads (see
/// `PARALLEL_SAMPLING_ROWS`); each still gets exactly what it gets alone.
#[test]
fn a_full_batch_of_seeded_samplers_matches_each_alone() {
    let engine = harness::engine(config());
    let jobs: Vec<(&str, Params)> = (0..16)
        .map(|i| {
            (
                PROMPTS[i % PROMPTS.len()],
                Params {
                    max_tokens: 12,
                    sampling: SamplingConfig {
                        temperature: 0.8,
                        top_p: 0.9,
                        seed: 500 + i as u64,
                        ..SamplingConfig::default()
                    },
                },
            )
        })
        .collect();
    let solo: Vec<_> = jobs
        .iter()
        .map(|(p, params)| harness::collect(submit(&engine, p, *params)))
        .collect();
    let streams: Vec<_> = jobs
        .iter()
        .map(|(p, params)| submit(&engine, p, *params))
        .collect();
    let together: Vec<_> = streams.into_iter().map(harness::collect).collect();
    assert_eq!(engine.stats().peak_batch_size, 16, "never one step of 16");
    assert_eq!(solo, together);
}

/// Stop strings are applied by the reader's stream (off the engine thread): the text is cut
/// where the first one starts, usage counts the tokens up to the one that completed it, and
/// by the time `Finished` is read the engine has retired the sequence, while the others of the
/// batch go on unchanged.
#[test]
fn a_stop_string_cuts_the_text_and_the_engine_retires_the_sequence_before_finished() {
    let engine = harness::engine(config());
    let with_ids = Params {
        max_tokens: 40,
        sampling: SamplingConfig {
            logprobs: edgerun_engine::Logprobs::Report { top: 0 },
            ..SamplingConfig::GREEDY
        },
    };
    // The whole greedy answer, and its token ids (read off the log-probabilities).
    let mut stream = submit(&engine, PROMPTS[3], with_ids);
    let (mut full, mut ids) = (String::new(), Vec::new());
    while let Some(ev) = stream.blocking_recv() {
        if let GenerationEvent::Token { text, logprobs } = ev {
            full.push_str(&text);
            ids.extend(logprobs.iter().map(|lp| lp.chosen.id));
        }
    }
    assert!(full.chars().count() > 40, "too short to cut: {full:?}");
    // A stop string from the middle of the answer (three characters from the 20th on, which
    // may also occur earlier: the first occurrence counts).
    let stop: String = full.chars().skip(20).take(3).collect();
    let at = full.find(&stop).unwrap();
    let tok = engine.tokenizer();
    let needed = (1..=ids.len())
        .find(|&n| tok.decode(&ids[..n]).unwrap().contains(&stop))
        .unwrap();

    let others: Vec<_> = PROMPTS[..3]
        .iter()
        .map(|p| submit(&engine, p, greedy(40)))
        .collect();
    let completed = engine.stats().requests_completed_total;
    let request = GenerationRequest {
        stopping: StopCriteria {
            max_tokens: 40,
            stop: vec![stop.clone()],
        },
        ..request(&engine, PROMPTS[3], greedy(40))
    };
    let mut stream = engine.submit(request, QueuePolicy::Wait).unwrap();
    let mut text = String::new();
    let (usage, reason) = loop {
        match stream.blocking_recv().expect("a Finished event") {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { usage, reason } => break (usage, reason),
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => panic!("{e}"),
            GenerationEvent::PromptProcessed { .. } => {}
        }
    };
    let stats = engine.stats();
    assert_eq!(text, full[..at], "stop {stop:?}");
    assert_eq!(reason, edgerun_engine::StopReason::StopString);
    assert_eq!(usage.completion_tokens, needed);
    assert_eq!(stats.requests_completed_total, completed + 1);
    assert_eq!(stats.requests_cancelled_total, 0);
    assert_eq!(stream.blocking_recv(), None);
    let solo = alone(&engine, &[greedy(40); 3]);
    let batch: Vec<_> = others.into_iter().map(harness::collect).collect();
    assert_eq!(solo, batch);
}
