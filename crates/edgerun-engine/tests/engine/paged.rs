//! The paged KV pool (GPUs' storage) on the CPU with the real model: the same forward pass as
//! contiguous caches, batch-invariant generation, blocks returned however a sequence ends, and
//! admission within the pool.

use crate::harness;

use candle_core::{Device, Tensor};
use edgerun_engine::{
    Engine, GenerationEvent, GenerationRequest, KvCache, KvPool, KvStorage, QueuePolicy,
    SamplingConfig, SchedulerConfig, Segment, StopCriteria, TokenStream,
};

const PROMPTS: [&str; 4] = [
    "Write a haiku about the sea.",
    "What is 17 times 3? Explain briefly.",
    "List three colours of the rainbow, then describe each one in a sentence.",
    "Tell me a very short story about a robot who learns to paint.",
];

fn paged(budget_mib: usize) -> SchedulerConfig {
    SchedulerConfig {
        prefill_chunk: 8,
        kv_cache_budget: Some(budget_mib << 20),
        kv_storage: KvStorage::Paged { block_size: 16 },
        ..SchedulerConfig::default()
    }
}

fn submit(
    engine: &Engine,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingConfig,
) -> TokenStream {
    let input = edgerun_engine::PromptInput::Prompt {
        text: prompt.to_string(),
        raw: false,
    };
    let request = GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling,
        stopping: StopCriteria::max_tokens(max_tokens),
        constraint: edgerun_engine::Constraint::Free,
    };
    engine.submit(request, QueuePolicy::Wait).unwrap()
}

fn rows(t: Option<Tensor>) -> Vec<Vec<f32>> {
    t.unwrap().to_vec2::<f32>().unwrap()
}

/// The same math: logits within what activation quantization moves them by when two paths
/// round differently (each path is 0.7-1.5 from exact math at its worst logit, tests/engine/
/// fidelity.rs, so two paths may be further apart than either is from exact), and the same
/// argmax but at near ties.
fn close(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
    for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
        let diff = ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 2.0, "{what}, sequence {i}: logits differ by {diff}");
        let (ta, tb) = (edgerun_engine::argmax(ra), edgerun_engine::argmax(rb));
        if ta != tb {
            let mut sorted = ra.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            assert!(
                sorted[0] - sorted[1] < NEAR_TIE,
                "{what}, sequence {i}: argmax {ta} vs {tb}"
            );
        }
    }
}

/// The model's forward pass over paged caches gives the logits contiguous caches give: prompts
/// read in chunks that cross block boundaries, then a step mixing decoding sequences with a
/// prompt chunk (the batched decode attention and the reordering of outputs), then decodes.
#[test]
fn paged_forward_matches_contiguous_caches() {
    let loaded = harness::load();
    let model = &loaded.model;
    let layout = model.kv_layout();
    let pool = KvPool::new(&layout, 64, 16, &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| loaded.tokenizer.encode(p).unwrap())
        .collect();
    let contiguous = |n: usize| KvCache::new(&layout, n, &Device::Cpu).unwrap();
    let mut c_caches: Vec<KvCache> = prompts.iter().map(|p| contiguous(p.len() + 8)).collect();
    let mut p_caches: Vec<KvCache> = prompts
        .iter()
        .map(|p| pool.cache(p.len() + 8).unwrap())
        .collect();
    assert!(pool.available() < 64);

    // Step 1: sequences 0-2 read their prompts, 17 tokens at most (crossing a block).
    let chunk = |p: &Vec<u32>| p[..p.len().min(17)].to_vec();
    let step1: Vec<Vec<u32>> = prompts[..3].iter().map(chunk).collect();
    let run = |caches: &mut [KvCache], inputs: &[Vec<u32>], want: &[usize]| {
        let mut segs: Vec<Segment<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| Segment { tokens, cache })
            .collect();
        rows(model.forward(&mut segs, want).unwrap())
    };
    let a = run(&mut c_caches[..3], &step1, &[0, 1, 2]);
    let b = run(&mut p_caches[..3], &step1, &[0, 1, 2]);
    close(&a, &b, "prefill");

    // Then three sequences decode (their argmax) while the fourth reads its prompt, and all
    // four decode.
    let mut inputs: Vec<Vec<u32>> = a
        .iter()
        .map(|row| vec![edgerun_engine::argmax(row)])
        .collect();
    inputs.push(prompts[3].clone());
    for step in 0..6 {
        let want: Vec<usize> = (0..inputs.len()).collect();
        let a = run(&mut c_caches, &inputs, &want);
        let b = run(&mut p_caches, &inputs, &want);
        close(&a, &b, &format!("step {step}"));
        // Both continue from the contiguous run's tokens (teacher forcing).
        inputs = a
            .iter()
            .map(|row| vec![edgerun_engine::argmax(row)])
            .collect();
    }
    for (c, p) in c_caches.iter().zip(&p_caches) {
        assert_eq!(c.len(), p.len());
    }
    drop(p_caches);
    assert_eq!(pool.available(), 64, "every block back in the pool");
}

/// A greedy generation as the engine reports it: each token's id and its step's top-2 margin.
fn greedy_steps(engine: &Engine, prompt: &str, max_tokens: usize) -> Vec<(u32, f32)> {
    collect_steps(submit(engine, prompt, max_tokens, greedy_with_margins()))
}

fn greedy_with_margins() -> SamplingConfig {
    SamplingConfig {
        logprobs: edgerun_engine::Logprobs::Report { top: 2 },
        ..SamplingConfig::GREEDY
    }
}

fn collect_steps(mut stream: TokenStream) -> Vec<(u32, f32)> {
    let mut steps = Vec::new();
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            GenerationEvent::Token { logprobs, .. } => {
                for lp in logprobs {
                    let margin =
                        lp.top[0].logprob - lp.top.get(1).map_or(f32::NEG_INFINITY, |t| t.logprob);
                    steps.push((lp.chosen.id, margin));
                }
            }
            GenerationEvent::Finished { .. } => return steps,
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => {
                panic!("generation failed: {e}")
            }
            GenerationEvent::PromptProcessed { .. } => {}
        }
    }
    panic!("stream ended without Finished");
}

/// The fidelity rule: `got` is `reference` token for token, or leaves it only where the
/// reference's top-2 margin was a near tie (activation quantization moves logits by tenths).
fn same_but_near_ties(reference: &[(u32, f32)], got: &[(u32, f32)], what: &str) {
    match reference.iter().zip(got).position(|(a, b)| a.0 != b.0) {
        None => assert_eq!(reference.len(), got.len(), "{what}: lengths differ"),
        Some(step) => assert!(
            reference[step].1 < NEAR_TIE,
            "{what}: differs at step {step}, where the margin was {} (not a near tie)",
            reference[step].1
        ),
    }
}

/// A top-2 logit margin under which two implementations of the same math may pick either.
const NEAR_TIE: f32 = 0.5;

/// Greedy generations through the engine over a paged pool are those of contiguous caches
/// (but at near ties), alone or four at once, and every block comes back.
#[test]
fn paged_engine_generates_what_contiguous_caches_do() {
    let contiguous = harness::engine(SchedulerConfig {
        prefill_chunk: 8,
        ..SchedulerConfig::default()
    });
    let engine = harness::engine(paged(64));
    let stats = engine.stats();
    assert!(stats.kv_pool_total_blocks > 0);
    assert_eq!(stats.kv_pool_free_blocks, stats.kv_pool_total_blocks);
    let reference: Vec<_> = PROMPTS
        .iter()
        .map(|p| greedy_steps(&contiguous, p, 40))
        .collect();
    let alone: Vec<_> = PROMPTS
        .iter()
        .map(|p| greedy_steps(&engine, p, 40))
        .collect();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| submit(&engine, p, 40, greedy_with_margins()))
        .collect();
    let together: Vec<_> = streams.into_iter().map(collect_steps).collect();
    assert_eq!(engine.stats().peak_batch_size, 4, "never batched");
    for i in 0..PROMPTS.len() {
        assert!(
            reference[i].len() >= 5,
            "prompt {i}: {} tokens",
            reference[i].len()
        );
        same_but_near_ties(
            &reference[i],
            &alone[i],
            &format!("prompt {i}, paged alone"),
        );
        same_but_near_ties(
            &reference[i],
            &together[i],
            &format!("prompt {i}, paged in a batch"),
        );
    }
    // Seeded sampling is reproducible over the pool.
    let seeded = SamplingConfig {
        temperature: 0.9,
        top_p: 0.95,
        seed: 7,
        ..SamplingConfig::default()
    };
    let first = harness::collect(submit(&engine, PROMPTS[3], 30, seeded));
    assert_eq!(
        first,
        harness::collect(submit(&engine, PROMPTS[3], 30, seeded))
    );
    let stats = engine.stats();
    assert_eq!(
        stats.kv_pool_free_blocks, stats.kv_pool_total_blocks,
        "{stats:?}"
    );
}

/// Cancelled sequences, while reading the prompt or decoding, give their blocks back.
#[test]
fn cancelled_sequences_return_their_blocks() {
    let engine = harness::engine(paged(64));
    let total = engine.stats().kv_pool_total_blocks;
    let mut stream = submit(&engine, PROMPTS[0], 200, SamplingConfig::GREEDY);
    let long = submit(&engine, &"word ".repeat(500), 5, SamplingConfig::GREEDY);
    let mut seen = 0;
    while seen < 3 {
        match stream.blocking_recv() {
            Some(GenerationEvent::Token { .. }) => seen += 1,
            Some(GenerationEvent::Finished { .. }) | None => panic!("finished early"),
            _ => {}
        }
    }
    assert!(engine.stats().kv_pool_free_blocks < total);
    drop(stream);
    drop(long);
    let started = std::time::Instant::now();
    while engine.stats().kv_pool_free_blocks != total || engine.stats().active_sequences != 0 {
        assert!(started.elapsed().as_secs() < 10, "{:?}", engine.stats());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // And the engine still serves.
    let (_, n) = harness::collect(submit(&engine, "Hi", 3, SamplingConfig::GREEDY));
    assert!(n >= 1);
}

/// A request that could never fit the pool is refused at once; ones that fit alone all
/// complete, however little room they leave each other, and a full pool fails none.
#[test]
fn the_pool_bounds_admission() {
    let loaded = harness::load();
    let per_block = loaded.model.kv_layout().bytes_for(16);
    // Ten blocks: 160 positions, not two requests of ~110 positions each at once.
    let engine = Engine::start(
        loaded,
        SchedulerConfig {
            kv_cache_budget: Some(10 * per_block),
            kv_storage: KvStorage::Paged { block_size: 16 },
            ..SchedulerConfig::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(engine.stats().kv_pool_total_blocks, 10);
    let a = submit(&engine, PROMPTS[0], 80, SamplingConfig::GREEDY);
    let b = submit(&engine, PROMPTS[1], 80, SamplingConfig::GREEDY);
    let (ta, _) = harness::collect(a);
    let (tb, _) = harness::collect(b);
    assert!(!ta.is_empty() && !tb.is_empty());
    let stats = engine.stats();
    assert_eq!(stats.sequences_failed_total, 0, "{stats:?}");
    assert_eq!(stats.kv_pool_free_blocks, 10, "{stats:?}");
    let input = edgerun_engine::PromptInput::Prompt {
        text: PROMPTS[0].into(),
        raw: false,
    };
    let too_big = GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling: SamplingConfig::GREEDY,
        stopping: StopCriteria::max_tokens(200),
        constraint: edgerun_engine::Constraint::Free,
    };
    match engine.submit(too_big, QueuePolicy::Wait) {
        Err(edgerun_engine::EngineError::KvCacheBudgetExceeded { .. }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a request larger than the pool was accepted"),
    }
}

/// A paged configuration without a budget to size the pool is refused at start.
#[test]
fn paged_storage_needs_a_budget() {
    let config = SchedulerConfig {
        kv_storage: KvStorage::Paged { block_size: 16 },
        ..SchedulerConfig::default()
    };
    assert!(config.validate().is_err());
    assert!(SchedulerConfig::gpu_default().validate().is_err());
    let with_budget = SchedulerConfig {
        kv_cache_budget: Some(1 << 30),
        ..SchedulerConfig::gpu_default()
    };
    assert!(with_budget.validate().is_ok());
}

/// The device check `scripts/gpu-check.sh` runs, on the CPU: our kernels over a paged pool
/// against candle's over contiguous caches, on the real model.
#[test]
fn device_check_passes_on_the_cpu() {
    let check = edgerun_engine::device_check::DeviceCheck {
        steps: 12,
        batch: 4,
        storage: KvStorage::Paged { block_size: 16 },
        ..Default::default()
    };
    let report =
        edgerun_engine::device_check::compare(&harness::model_path(), &Device::Cpu, check).unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.steps, 12);
    assert!(
        report.max_logit_diff > 0.0,
        "our kernels and candle's round differently"
    );
    // 7 kinds of sampling over 8 rows each, nearly all decided by the device sampler.
    assert_eq!(report.sampled_rows, 56);
    assert!(report.sampled_on_device >= 48, "{report}");
    assert!(report.logprob_rows >= 40, "{report}");
    println!("{report}");
}

/// Prompts whose answers run long with wide margins (lists, counting): the test below needs
/// generations that go on growing, which an early end-of-turn at a near tie would cut short.
const LONG_PROMPTS: [&str; 4] = [
    "Count from one to fifty in words, separated by commas.",
    "Write the numbers from 1 to 40, one per line.",
    "List twenty animals, one per line, numbered.",
    "Write the alphabet from A to Z, each letter followed by a word starting with it.",
];

/// A pool too small for everyone's whole generation: sequences take blocks as they grow, the
/// newest gives its blocks back when the pool runs out and reads its prompt and output again
/// later. Every generation completes with what it generates alone (but at near ties), and
/// every block comes back.
#[test]
fn a_full_pool_preempts_the_newest_and_recomputes_it() {
    let contiguous = harness::engine(SchedulerConfig {
        prefill_chunk: 8,
        ..SchedulerConfig::default()
    });
    let reference: Vec<_> = LONG_PROMPTS
        .iter()
        .map(|p| greedy_steps(&contiguous, p, 60))
        .collect();
    drop(contiguous);

    let loaded = harness::load();
    let per_block = loaded.model.kv_layout().bytes_for(16);
    let prompt_blocks: Vec<usize> = LONG_PROMPTS
        .iter()
        .map(|p| {
            let input = edgerun_engine::PromptInput::Prompt {
                text: p.to_string(),
                raw: false,
            };
            let n =
                edgerun_engine::Engine::start(harness::load(), SchedulerConfig::default(), None)
                    .unwrap()
                    .prepare(&input, &[])
                    .unwrap()
                    .len();
            (n + 60).div_ceil(16)
        })
        .collect();
    // Room for the largest generation alone and a little more: not for all four at once.
    let blocks = prompt_blocks.iter().max().unwrap() + 3;
    assert!(prompt_blocks.iter().sum::<usize>() > blocks + 4);
    let engine = Engine::start(
        loaded,
        SchedulerConfig {
            prefill_chunk: 8,
            kv_cache_budget: Some(blocks * per_block),
            kv_storage: KvStorage::Paged { block_size: 16 },
            // The prompts share the chat template's system prompt: cached once, it would leave
            // room enough that nothing needs preempting.
            prefix_caching: false,
            ..SchedulerConfig::default()
        },
        None,
    )
    .unwrap();
    let streams: Vec<_> = LONG_PROMPTS
        .iter()
        .map(|p| submit(&engine, p, 60, greedy_with_margins()))
        .collect();
    let got: Vec<_> = streams.into_iter().map(collect_steps).collect();
    let stats = engine.stats();
    assert!(
        stats.preemptions_total > 0,
        "nothing was preempted: {stats:?}"
    );
    for i in 0..LONG_PROMPTS.len() {
        same_but_near_ties(
            &reference[i],
            &got[i],
            &format!("prompt {i}, preempted pool"),
        );
    }
    assert_eq!(stats.active_sequences, 0);
    assert_eq!(stats.preempted_sequences, 0);
    assert_eq!(
        stats.kv_pool_free_blocks, stats.kv_pool_total_blocks,
        "{stats:?}"
    );
    // Prompt tokens are counted once, however often they were read.
    let prompt_total: usize = stats.prompt_tokens_total;
    let (_, _) = harness::collect(submit(&engine, "Hi", 2, SamplingConfig::GREEDY));
    assert!(engine.stats().prompt_tokens_total > prompt_total);
}

/// On the device-first path a plain greedy sequence's token is picked where the logits are
/// (only its id crosses to the host); it is the token the host's argmax picks from the same
/// logits (a sequence asking for log-probabilities takes the host path).
#[test]
fn argmax_on_the_device_picks_what_the_host_picks() {
    let engine = harness::engine(paged(64));
    for prompt in PROMPTS {
        let on_device = harness::collect(submit(&engine, prompt, 30, SamplingConfig::GREEDY));
        let on_host = harness::collect(submit(&engine, prompt, 30, greedy_with_margins()));
        assert!(!on_device.0.is_empty());
        assert_eq!(on_device, on_host, "{prompt}");
    }
    // Both paths in one step.
    let streams: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = if i % 2 == 0 {
                SamplingConfig::GREEDY
            } else {
                greedy_with_margins()
            };
            submit(&engine, p, 30, sampling)
        })
        .collect();
    for (s, p) in streams.into_iter().zip(PROMPTS) {
        let (text, n) = harness::collect(s);
        assert!(!text.is_empty() && n > 0, "{p}");
    }
}

/// Sampling parameters of every kind the device sampler decides: nucleus, top-k, both, the
/// whole vocabulary, penalties (greedy and sampled), each seeded.
fn sampling_kinds() -> Vec<SamplingConfig> {
    let seeded = |seed| SamplingConfig {
        temperature: 0.8,
        seed,
        ..SamplingConfig::default()
    };
    vec![
        SamplingConfig {
            top_p: 0.9,
            ..seeded(1)
        },
        SamplingConfig {
            top_k: 40,
            temperature: 1.2,
            ..seeded(2)
        },
        SamplingConfig {
            top_k: 20,
            top_p: 0.8,
            ..seeded(3)
        },
        SamplingConfig {
            temperature: 1.0,
            ..seeded(4)
        },
        SamplingConfig {
            top_p: 0.95,
            repetition_penalty: 1.3,
            frequency_penalty: 0.4,
            presence_penalty: 0.2,
            ..seeded(5)
        },
        SamplingConfig {
            repetition_penalty: 1.5,
            presence_penalty: 0.5,
            ..SamplingConfig::GREEDY
        },
    ]
}

/// Sampling where the logits are (only ids come back) picks, for each kind of sampling and
/// seed, the tokens the host sampler picks from the same logits; and most rows are decided
/// on the device (the rest are handed back and finished on the host with the same draw).
#[test]
fn sampling_on_the_device_is_the_host_sampler() {
    let on_device = harness::engine(paged(64));
    let on_host = harness::engine(SchedulerConfig {
        device_sampling: false,
        ..paged(64)
    });
    for (i, sampling) in sampling_kinds().into_iter().enumerate() {
        for prompt in &PROMPTS[..2] {
            let device = harness::collect(submit(&on_device, prompt, 24, sampling));
            let host = harness::collect(submit(&on_host, prompt, 24, sampling));
            assert!(device.1 > 0, "kind {i}");
            assert_eq!(device, host, "kind {i}: {sampling:?}, {prompt}");
        }
    }
    let stats = on_device.stats();
    let returned = stats.device_sampling_host_rows_total;
    assert!(
        stats.device_sampled_tokens_total >= 10 * returned.max(1),
        "{} sampled on the device, {returned} handed back",
        stats.device_sampled_tokens_total
    );
    assert_eq!(on_host.stats().device_sampled_tokens_total, 0);
}

/// In one step, rows sampled on the device and rows copied to the host (300 log-probabilities
/// asked for: more than the device's candidate list holds) get their own tokens: the same
/// prompt and sampling twice in one batch, once on each path, gives one output (row-invariant
/// kernels, equal histories).
#[test]
fn device_and_host_rows_share_a_step() {
    let engine = harness::engine(paged(64));
    let kinds = sampling_kinds();
    let requests: Vec<_> = PROMPTS
        .iter()
        .zip(&kinds)
        .flat_map(|(prompt, &sampling)| {
            let reported = SamplingConfig {
                logprobs: edgerun_engine::Logprobs::Report { top: 300 },
                ..sampling
            };
            [(prompt, sampling), (prompt, reported)]
        })
        .collect();
    // A long prompt keeps the engine busy while the pairs are submitted, so that they are
    // admitted at one step boundary.
    let blocker = submit(&engine, &PROMPTS[2].repeat(8), 4, SamplingConfig::GREEDY);
    let streams: Vec<_> = requests
        .iter()
        .map(|(p, s)| submit(&engine, p, 24, *s))
        .collect();
    let outputs: Vec<_> = streams.into_iter().map(harness::collect).collect();
    harness::collect(blocker);
    for (pair, kind) in outputs.chunks(2).zip(&kinds) {
        assert!(pair[0].1 > 0);
        assert_eq!(pair[0], pair[1], "{kind:?}");
    }
    let stats = engine.stats();
    assert!(stats.device_sampled_tokens_total > 0);
    assert!(stats.device_sampling_host_rows_total > 0);
    assert!(stats.peak_batch_size >= 8);
}

/// Log-probabilities of tokens sampled on the device are computed there too (only a few
/// values per row come back): the same tokens as the host path's, and the same
/// log-probabilities to f32 rounding, for every kind of sampling.
#[test]
fn log_probabilities_on_the_device_are_the_hosts() {
    let on_device = harness::engine(paged(64));
    let on_host = harness::engine(SchedulerConfig {
        device_sampling: false,
        ..paged(64)
    });
    let reported = |stream: TokenStream| -> Vec<edgerun_engine::TokenLogprob> {
        let mut stream = stream;
        let mut all = Vec::new();
        while let Some(ev) = stream.blocking_recv() {
            match ev {
                GenerationEvent::Token { logprobs, .. } => all.extend(logprobs),
                GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => panic!("{e}"),
                _ => {}
            }
        }
        all
    };
    for (i, sampling) in sampling_kinds().into_iter().enumerate() {
        let sampling = SamplingConfig {
            logprobs: edgerun_engine::Logprobs::Report { top: 5 },
            ..sampling
        };
        let device = reported(submit(&on_device, PROMPTS[i % 2], 16, sampling));
        let host = reported(submit(&on_host, PROMPTS[i % 2], 16, sampling));
        assert_eq!(device.len(), host.len(), "kind {i}");
        assert!(!device.is_empty());
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        for (d, h) in device.iter().zip(&host) {
            assert_eq!(d.chosen.id, h.chosen.id, "kind {i}");
            assert!(
                close(d.chosen.logprob, h.chosen.logprob),
                "kind {i}: {d:?} {h:?}"
            );
            let ids = |t: &edgerun_engine::TokenLogprob| -> Vec<u32> {
                t.top.iter().map(|e| e.id).collect()
            };
            assert_eq!(ids(d), ids(h), "kind {i}");
            for (a, b) in d.top.iter().zip(&h.top) {
                assert!(close(a.logprob, b.logprob), "kind {i}: {d:?} {h:?}");
                assert_eq!(a.bytes, b.bytes);
            }
        }
    }
    let stats = on_device.stats();
    assert!(
        stats.device_sampled_tokens_total > 10 * stats.device_sampling_host_rows_total.max(1),
        "{stats:?}"
    );
}

/// Drains a stream: its tokens' ids and its usage.
fn ids_and_usage(stream: TokenStream) -> (Vec<u32>, edgerun_engine::Usage) {
    let (_, ids, usage) = text_ids_and_usage(stream);
    (ids.into_iter().map(|(id, _)| id).collect(), usage)
}

/// The prefix cache changes the work, never the output: on the CPU, where every kernel's rows
/// are independent of the batch and of how a prompt is chunked, a prompt that reuses cached
/// blocks generates bit for bit what it generates on a node without the cache (greedy and
/// seeded, over several prompt chunk sizes and hit lengths: a shared system prompt, a
/// conversation's next turn, the same prompt again), and usage says how many prompt tokens
/// were cached.
#[test]
fn a_prefix_cache_hit_changes_the_work_never_the_output() {
    let system = "You are a careful assistant for a small museum of maritime history. Answer \
                  in one short paragraph, plainly, without lists or headings. Think about the \
                  question before you answer it, say so when you do not know, and never invent \
                  dates, names or numbers. Visitors are often children, so keep your words \
                  simple and friendly, and explain any word a child may not know. ";
    let turn1 = format!("{system}Question: what is the capital of France?");
    let turn2 = format!("{turn1} Answer: Paris. Question: and of Italy?");
    let other = format!("{system}Question: name a colour of the sky.");
    let seeded = SamplingConfig {
        temperature: 0.9,
        top_p: 0.95,
        seed: 7,
        logprobs: edgerun_engine::Logprobs::Report { top: 1 },
        ..SamplingConfig::default()
    };
    let greedy = SamplingConfig {
        logprobs: edgerun_engine::Logprobs::Report { top: 1 },
        ..SamplingConfig::GREEDY
    };
    for chunk in [8, 48, 64] {
        // What a hit reuses: whole 16-position blocks, however prompts are chunked.
        let granularity = 16;
        let config = |prefix_caching| SchedulerConfig {
            prefill_chunk: chunk,
            prefix_caching,
            ..paged(64)
        };
        let cold = harness::engine(config(false));
        let warm = harness::engine(config(true));
        let mut cached_any = 0;
        for (i, prompt) in [&turn1, &turn1, &turn2, &other, &turn2].iter().enumerate() {
            for sampling in [greedy, seeded] {
                let (want, cold_usage) = ids_and_usage(submit(&cold, prompt, 12, sampling));
                let (got, usage) = ids_and_usage(submit(&warm, prompt, 12, sampling));
                assert_eq!(
                    got, want,
                    "chunk {chunk}, prompt {i}: the cache changed the output"
                );
                assert_eq!(cold_usage.cached_tokens, 0);
                assert_eq!(usage.prompt_tokens, cold_usage.prompt_tokens);
                assert!(usage.cached_tokens < usage.prompt_tokens);
                assert_eq!(usage.cached_tokens % granularity, 0, "whole blocks only");
                if i > 0 {
                    assert!(
                        usage.cached_tokens >= 64,
                        "chunk {chunk}, prompt {i}: only {} tokens cached",
                        usage.cached_tokens
                    );
                }
                cached_any += usage.cached_tokens;
            }
        }
        let stats = warm.stats();
        assert_eq!(stats.prompt_tokens_cached_total, cached_any);
        assert!(stats.prefix_cache_blocks > 0);
        assert_eq!(cold.stats().prefix_cache_blocks, 0);
        drop(cold);
        // Every block is back in the pool or cached (and counted free) once nothing runs.
        assert_eq!(stats.kv_pool_free_blocks, stats.kv_pool_total_blocks);
    }
}

/// Drains a stream: its text, its tokens' ids and log-probabilities (as bits), and its usage.
fn text_ids_and_usage(mut stream: TokenStream) -> (String, Vec<(u32, u32)>, edgerun_engine::Usage) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            GenerationEvent::Token { text: t, logprobs } => {
                text.push_str(&t);
                ids.extend(
                    logprobs
                        .iter()
                        .map(|l| (l.chosen.id, l.chosen.logprob.to_bits())),
                );
            }
            GenerationEvent::Finished { usage, .. } => return (text, ids, usage),
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => {
                panic!("generation failed: {e}")
            }
            GenerationEvent::PromptProcessed { .. } => {}
        }
    }
    panic!("stream ended without Finished");
}

/// A conversation's next turn begins with the previous turn's answer, whose keys and values
/// were computed one token at a time while it was generated: reusing them changes nothing
/// either (the tokens and their log-probabilities bit for bit a cold node's), and the reuse
/// reaches into the answer.
#[test]
fn reusing_a_generated_answer_changes_nothing() {
    use edgerun_engine::{ChatMessage, PromptInput};
    let greedy = SamplingConfig {
        logprobs: edgerun_engine::Logprobs::Report { top: 1 },
        ..SamplingConfig::GREEDY
    };
    let ask = |engine: &Engine, messages: &[ChatMessage]| {
        let request = GenerationRequest {
            prompt: engine
                .prepare(&PromptInput::Messages(messages.to_vec()), &[])
                .unwrap(),
            sampling: greedy,
            stopping: StopCriteria::max_tokens(40),
            constraint: edgerun_engine::Constraint::Free,
        };
        text_ids_and_usage(engine.submit(request, QueuePolicy::Wait).unwrap())
    };
    for chunk in [8, 48] {
        let config = |prefix_caching| SchedulerConfig {
            prefill_chunk: chunk,
            prefix_caching,
            ..paged(64)
        };
        let cold = harness::engine(config(false));
        let warm = harness::engine(config(true));
        let mut messages = vec![ChatMessage::new(
            "system",
            "You are a lighthouse keeper. Answer in a few sentences.",
        )];
        let mut previous_prompt = 0;
        for (turn, question) in [
            "What do you do at night?",
            "And when there is fog?",
            "Who brings you food?",
        ]
        .iter()
        .enumerate()
        {
            messages.push(ChatMessage::new("user", *question));
            let (text, want, _) = ask(&cold, &messages);
            let (_, got, usage) = ask(&warm, &messages);
            assert_eq!(
                got, want,
                "chunk {chunk}, turn {turn}: the cache changed the output"
            );
            if turn > 0 {
                assert!(
                    usage.cached_tokens > previous_prompt,
                    "chunk {chunk}, turn {turn}: {} of {} cached, the previous prompt was {}",
                    usage.cached_tokens,
                    usage.prompt_tokens,
                    previous_prompt
                );
            }
            previous_prompt = usage.prompt_tokens;
            messages.push(ChatMessage::new("assistant", text));
        }
    }
}
