//! Faults, slow readers and admission on the real model: a failing sequence fails alone, a
//! broken device shows in `health()` and recovers, a client that stops reading is paused and
//! then dropped, and queue places are exact. Faults are injected with the `fault-injection`
//! feature (enabled for these tests only, see Cargo.toml).

use crate::harness;

use edgerun_engine::faults::Faults;
use edgerun_engine::{
    Engine, EngineError, GenerationEvent, GenerationRequest, Health, PromptInput, QueuePolicy,
    SamplingConfig, SchedulerConfig, StopCriteria, TokenStream, FAILING_AFTER,
};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const GOOD: [&str; 3] = [
    "Write a haiku about the sea.",
    "What is 17 times 3? Explain briefly.",
    "List three colours of the rainbow.",
];
const POISONED: &str = "Describe a quetzal bird perched on a xylophone.";

fn request(engine: &Engine, prompt: &str, max_tokens: usize) -> GenerationRequest {
    let input = PromptInput::Prompt {
        text: prompt.to_string(),
        raw: false,
    };
    GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling: SamplingConfig::GREEDY,
        stopping: StopCriteria::max_tokens(max_tokens),
        constraint: edgerun_engine::Constraint::Free,
    }
}

fn submit(engine: &Engine, prompt: &str, max_tokens: usize) -> TokenStream {
    engine
        .submit(request(engine, prompt, max_tokens), QueuePolicy::Wait)
        .unwrap()
}

/// The text, or the failure message.
fn outcome(mut stream: TokenStream) -> Result<String, String> {
    let mut text = String::new();
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { .. } => return Ok(text),
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => return Err(e),
            GenerationEvent::PromptProcessed { .. } => {}
        }
    }
    panic!("stream ended without Finished or Failed");
}

/// A token of the poisoned prompt that neither the good prompts nor their answers use.
fn poison_token(engine: &Engine, answers: &[String]) -> u32 {
    let tokenizer = engine.tokenizer();
    let mut used = BTreeSet::new();
    for text in GOOD
        .iter()
        .map(|s| s.to_string())
        .chain(answers.iter().cloned())
    {
        used.extend(request(engine, &text, 1).prompt);
        used.extend(tokenizer.encode(&text).unwrap());
    }
    let poisoned = request(engine, POISONED, 1).prompt;
    *poisoned
        .iter()
        .find(|t| !used.contains(t))
        .expect("a token only the poisoned prompt has")
}

#[test]
fn a_failing_sequence_fails_alone_and_the_others_are_unchanged() {
    let engine = harness::engine(SchedulerConfig::default());
    let alone: Vec<String> = GOOD
        .iter()
        .map(|p| outcome(submit(&engine, p, 24)).unwrap())
        .collect();
    let token = poison_token(&engine, &alone);
    for (kind, faults) in [
        (
            "error",
            Faults {
                error_on_token: Some(token),
                ..Faults::default()
            },
        ),
        (
            "panic",
            Faults {
                panic_on_token: Some(token),
                ..Faults::default()
            },
        ),
        (
            "error after the cache was written",
            Faults {
                error_after_forward_on_token: Some(token),
                ..Faults::default()
            },
        ),
    ] {
        engine.inject_faults(faults);
        let failed_before = engine.stats().sequences_failed_total;
        let mut streams: Vec<TokenStream> = GOOD.iter().map(|p| submit(&engine, p, 24)).collect();
        streams.insert(1, submit(&engine, POISONED, 24));
        let mut outcomes: Vec<_> = streams.into_iter().map(outcome).collect();
        let poisoned = outcomes.remove(1);
        assert!(poisoned.is_err(), "{kind}: the poisoned sequence must fail");
        let together: Vec<String> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|e| panic!("{kind}: a good sequence failed: {e}")))
            .collect();
        assert_eq!(together, alone, "{kind}: the good sequences changed");
        let stats = engine.stats();
        assert_eq!(stats.sequences_failed_total, failed_before + 1, "{kind}");
        assert_eq!(stats.consecutive_device_failures, 0, "{kind}");
        assert_eq!(engine.health(), Health::Ready, "{kind}");
    }
    engine.inject_faults(Faults::default());
    assert_eq!(outcome(submit(&engine, GOOD[0], 24)).unwrap(), alone[0]);
    let stats = engine.stats();
    assert_eq!((stats.active_sequences, stats.queued_requests), (0, 0));
}

#[test]
fn a_device_that_keeps_failing_turns_health_failing_until_a_step_succeeds() {
    let engine = harness::engine(SchedulerConfig::default());
    engine.inject_faults(Faults {
        fail_every_step: true,
        ..Faults::default()
    });
    for k in 1..=FAILING_AFTER {
        let e = outcome(submit(&engine, GOOD[0], 8)).unwrap_err();
        assert!(e.contains("injected device failure"), "{e}");
        assert_eq!(engine.stats().consecutive_device_failures, k);
        if k < FAILING_AFTER {
            assert_eq!(engine.health(), Health::Ready, "after {k} failures");
        }
    }
    match engine.health() {
        Health::Failing(why) => assert!(why.contains("injected device failure"), "{why}"),
        other => panic!("expected Failing, got {other:?}"),
    }
    assert_eq!(engine.stats().device_failures_total, FAILING_AFTER);
    // Without any request, the idle engine probes itself and recovers.
    engine.inject_faults(Faults::default());
    let deadline = Instant::now() + edgerun_engine::IDLE_PROBE * 3;
    while engine.health() != Health::Ready {
        assert!(
            Instant::now() < deadline,
            "never recovered: {:?}",
            engine.health()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(engine.stats().consecutive_device_failures, 0);
    outcome(submit(&engine, GOOD[0], 8)).unwrap();
}

#[test]
fn a_client_that_stops_reading_is_paused_then_dropped_without_stalling_others() {
    let engine = harness::engine(SchedulerConfig {
        stalled_stream_timeout: Duration::from_secs(2),
        ..SchedulerConfig::default()
    });
    let counting = "Count from 1 to 300, separated by commas.";
    let base = engine.stats().generated_tokens_total;
    let stalled = submit(&engine, counting, 600);
    // Let it fill its buffer: it stops being computed long before 600 tokens.
    let started = Instant::now();
    let mut last = base;
    let mut still = 0;
    while still < 4 {
        std::thread::sleep(Duration::from_millis(300));
        let now = engine.stats().generated_tokens_total;
        still = if now == last && now > base {
            still + 1
        } else {
            0
        };
        last = now;
        assert!(started.elapsed() < Duration::from_secs(60), "never paused");
    }
    let generated = last - base;
    assert_eq!(engine.stats().active_sequences, 1, "it finished instead");
    assert!(
        generated < 600,
        "a paused sequence generated {generated} tokens"
    );
    // Others run normally meanwhile.
    outcome(submit(&engine, GOOD[0], 16)).unwrap();
    // After the timeout it is dropped, freeing its slot.
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.stats().sequences_stalled_total == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled stream was never dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = engine.stats();
    assert_eq!((stats.active_sequences, stats.queued_requests), (0, 0));
    // What was buffered is still delivered, then an error says why it ended.
    let e = outcome(stalled).unwrap_err();
    assert!(e.contains("did not read"), "{e}");
}

#[test]
fn queue_places_are_exact_and_given_back() {
    let engine = harness::engine(SchedulerConfig {
        max_batch_size: 1,
        max_queue: 1,
        ..SchedulerConfig::default()
    });
    let a = engine.reserve(QueuePolicy::Wait).unwrap();
    assert!(matches!(
        engine.reserve(QueuePolicy::RejectIfBusy),
        Err(EngineError::Busy)
    ));
    let b = engine.reserve(QueuePolicy::Wait).unwrap();
    assert!(matches!(
        engine.reserve(QueuePolicy::Wait),
        Err(EngineError::Busy)
    ));
    assert_eq!(engine.stats().queued_requests, 2);
    drop(a);
    assert_eq!(engine.stats().queued_requests, 1);
    // A request that fails validation gives its place back too.
    let input = PromptInput::Prompt {
        text: GOOD[0].to_string(),
        raw: false,
    };
    let text = edgerun_engine::OutputFormat::Text;
    let limits = edgerun_engine::GrammarLimits::DEFAULT;
    let b = b.prepare(&input, &[], &text, &limits).unwrap();
    assert_eq!(engine.stats().queued_requests, 1);
    assert!(b
        .submit(SamplingConfig::GREEDY, StopCriteria::max_tokens(0))
        .is_err());
    assert_eq!(engine.stats().queued_requests, 0);
    // And a place used for a real request is counted until the engine admits it.
    let c = engine.reserve(QueuePolicy::Wait).unwrap();
    let c = c.prepare(&input, &[], &text, &limits).unwrap();
    assert_eq!(c.prompt(), request(&engine, GOOD[0], 8).prompt);
    let stream = c
        .submit(SamplingConfig::GREEDY, StopCriteria::max_tokens(8))
        .unwrap();
    outcome(stream).unwrap();
    let stats = engine.stats();
    assert_eq!((stats.active_sequences, stats.queued_requests), (0, 0));
}

/// A device sampler that fails costs its steps the copies, not the sequences: every row is
/// sampled on the host, with the same draws, so a seeded request's output does not change.
#[test]
fn a_failing_device_sampler_falls_back_to_the_host() {
    let paged = SchedulerConfig {
        kv_cache_budget: Some(64 << 20),
        kv_storage: edgerun_engine::KvStorage::Paged { block_size: 16 },
        ..SchedulerConfig::default()
    };
    let sampled = |engine: &Engine| {
        let sampling = SamplingConfig {
            temperature: 0.8,
            top_p: 0.9,
            seed: 3,
            ..SamplingConfig::default()
        };
        let request = GenerationRequest {
            sampling,
            ..request(engine, GOOD[0], 24)
        };
        outcome(engine.submit(request, QueuePolicy::Wait).unwrap()).unwrap()
    };
    let engine = harness::engine(paged);
    let on_device = sampled(&engine);
    assert!(engine.stats().device_sampled_tokens_total > 0);
    let broken = harness::engine(paged);
    broken.inject_faults(Faults {
        fail_device_sampling: true,
        ..Faults::default()
    });
    let before = broken.stats();
    assert_eq!(sampled(&broken), on_device);
    let stats = broken.stats();
    assert_eq!(
        stats.device_sampled_tokens_total, before.device_sampled_tokens_total,
        "{stats:?}"
    );
    assert!(stats.device_sampling_host_rows_total >= before.device_sampling_host_rows_total + 24);
    assert_eq!(stats.sequences_failed_total, 0, "{stats:?}");
    assert_eq!(broken.health(), Health::Ready);
}
