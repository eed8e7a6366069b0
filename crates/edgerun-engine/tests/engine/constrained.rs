//! Constrained decoding on the real test model: output formats compile, the output follows
//! them, and a constrained sequence changes nothing for the others in its batch.

use crate::harness;

use edgerun_engine::{
    Engine, EngineError, GenerationRequest, OutputFormat, PromptInput, QueuePolicy, SamplingConfig,
    SchedulerConfig, StopCriteria,
};
use serde_json::{json, Value};

fn request(
    engine: &Engine,
    prompt: &str,
    format: &OutputFormat,
    max_tokens: usize,
) -> GenerationRequest {
    let input = PromptInput::Prompt {
        text: prompt.to_string(),
        raw: false,
    };
    let mut request = GenerationRequest::new(
        engine.prepare(&input, &[]).unwrap(),
        SamplingConfig::GREEDY,
        StopCriteria::max_tokens(max_tokens),
    );
    request.constraint = engine.constrain(format).unwrap();
    request
}

fn run(engine: &Engine, prompt: &str, format: &OutputFormat, max_tokens: usize) -> String {
    let stream = engine
        .submit(
            request(engine, prompt, format, max_tokens),
            QueuePolicy::Wait,
        )
        .unwrap();
    harness::collect(stream).0
}

fn person_schema() -> OutputFormat {
    OutputFormat::JsonSchema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "London", "Tokyo"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    }))
}

#[test]
fn json_schema_output_parses_and_follows_the_schema() {
    let engine = harness::engine(SchedulerConfig::default());
    let text = run(
        &engine,
        "Describe a person who lives in a big city, as JSON.",
        &person_schema(),
        120,
    );
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let obj = value.as_object().unwrap();
    assert_eq!(obj.len(), 3, "{text}");
    assert!(
        obj["name"].as_str().unwrap().chars().count() <= 20,
        "{text}"
    );
    assert!((0..=120).contains(&obj["age"].as_i64().unwrap()), "{text}");
    assert!(["Paris", "London", "Tokyo"].contains(&obj["city"].as_str().unwrap()));
    // Compact separators, no stray whitespace.
    assert!(
        !text.starts_with(char::is_whitespace) && !text.contains('\n'),
        "{text:?}"
    );
}

#[test]
fn lark_grammar_output_is_in_the_language() {
    let engine = harness::engine(SchedulerConfig::default());
    let yes_no = OutputFormat::Lark(r#"start: "yes" | "no""#.into());
    for prompt in ["Is the sky blue?", "Is fire cold?"] {
        let text = run(&engine, prompt, &yes_no, 10);
        assert!(text == "yes" || text == "no", "{text:?}");
    }
}

#[test]
fn a_constrained_neighbour_changes_nothing_for_the_others() {
    let engine = harness::engine(SchedulerConfig::default());
    let free_prompt = "Write a sentence about the sea.";
    let json_prompt = "Describe a person as JSON.";
    let free_alone = run(&engine, free_prompt, &OutputFormat::Text, 24);
    let json_alone = run(&engine, json_prompt, &person_schema(), 80);
    // Together, in one batch: submitted before either is admitted.
    let a = engine
        .submit(
            request(&engine, free_prompt, &OutputFormat::Text, 24),
            QueuePolicy::Wait,
        )
        .unwrap();
    let b = engine
        .submit(
            request(&engine, json_prompt, &person_schema(), 80),
            QueuePolicy::Wait,
        )
        .unwrap();
    let c = engine
        .submit(
            request(&engine, json_prompt, &person_schema(), 80),
            QueuePolicy::Wait,
        )
        .unwrap();
    assert_eq!(harness::collect(a).0, free_alone);
    assert_eq!(harness::collect(b).0, json_alone);
    assert_eq!(harness::collect(c).0, json_alone);
    assert!(engine.stats().peak_batch_size >= 2);
}

#[test]
fn a_format_that_cannot_compile_is_refused_before_queueing() {
    let engine = harness::engine(SchedulerConfig::default());
    for bad in [
        OutputFormat::JsonSchema(
            json!({"type": "object", "properties": {"a": {"$ref": "#/nope"}}, "required": ["a"]}),
        ),
        OutputFormat::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        OutputFormat::Lark("start: undefined_rule".into()),
    ] {
        match engine.constrain(&bad) {
            Err(EngineError::InvalidFormat(why)) => assert!(!why.is_empty()),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(engine.stats().queued_requests, 0);
}

#[test]
fn max_tokens_still_ends_a_constrained_sequence() {
    let engine = harness::engine(SchedulerConfig::default());
    let long = OutputFormat::JsonSchema(json!({
        "type": "array", "items": {"type": "string"}, "minItems": 50
    }));
    let stream = engine
        .submit(
            request(&engine, "List fifty words.", &long, 12),
            QueuePolicy::Wait,
        )
        .unwrap();
    let (text, tokens) = harness::collect(stream);
    assert_eq!(tokens, 12);
    assert!(text.starts_with("[\""), "{text:?}");
}

/// `d0 = {type: object, properties: {x: {$ref: d1}}, required: [x]}`, ....
fn object_chain(n: usize) -> serde_json::Value {
    let mut defs = serde_json::Map::new();
    for i in 0..n {
        defs.insert(
            format!("d{i}"),
            json!({"type": "object", "properties": {"x": {"$ref": format!("#/$defs/d{}", i + 1)}},
                   "required": ["x"]}),
        );
    }
    defs.insert(format!("d{n}"), json!({"type": "string", "maxLength": 3}));
    json!({"$ref": "#/$defs/d0", "$defs": defs})
}

#[test]
fn the_deepest_schema_allowed_compiles_on_its_own_stack() {
    // A chain as deep as the wire layer lets through (42 links of 3 levels: depth 128) once
    // overflowed whatever thread compiled it; a caller with a small stack (256 KiB, less than
    // llguidance needs for a fraction of it) shows the compile runs on a stack of its own.
    let engine = harness::engine(SchedulerConfig::default());
    let schema = object_chain(42);
    let measured = edgerun_protocol_free_depth(&schema);
    assert!(measured <= 128, "{measured}");
    let format = OutputFormat::JsonSchema(schema);
    let compiled = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn({
            let engine = engine.clone();
            move || engine.constrain(&format).map(|_| ())
        })
        .unwrap()
        .join()
        .expect("the compile did not overflow its caller's stack");
    compiled.unwrap();
}

/// Containers on the chain's path (the wire layer's depth, counted here without it: the
/// engine does not depend on the protocol crate).
fn edgerun_protocol_free_depth(schema: &serde_json::Value) -> usize {
    let links = schema["$defs"].as_object().unwrap().len() - 1;
    1 + 3 * links + 1
}

#[test]
fn a_compile_over_its_budget_is_refused_naming_the_limit() {
    let engine = harness::engine(SchedulerConfig::default());
    // Warm the grammar engine (the token trie) so the budget is the compile's own.
    engine.constrain(&person_schema()).unwrap();
    let tight = edgerun_engine::GrammarLimits {
        compile_budget: std::time::Duration::from_micros(1),
        ..edgerun_engine::GrammarLimits::DEFAULT
    };
    // Thousands of alternatives: milliseconds of work, far over a microsecond.
    let heavy = OutputFormat::JsonSchema(json!({"anyOf": (0..3000)
        .map(|i| json!({"type": "object", "properties": {format!("k{i}"): {"type": "string",
            "pattern": format!("^v{i}[a-z]{{2,9}}$")}}, "required": [format!("k{i}")]}))
        .collect::<Vec<_>>()}));
    match engine.constrain_within(&heavy, &tight) {
        Err(EngineError::FormatLimit(why)) => {
            assert!(why.contains("compile-time limit"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_format_no_finite_output_meets_ends_as_the_callers_not_the_engines() {
    // Finding 5: no finite JSON satisfies this; the grammar engine gives up while generating.
    // The wire layer refuses it before it gets here; the engine still must not call it an
    // engine failure, nor put parser state in the message (finding 6).
    let engine = harness::engine(SchedulerConfig::default());
    let unsat = OutputFormat::JsonSchema(
        json!({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
    );
    let mut stream = engine
        .submit(request(&engine, "Answer.", &unsat, 400), QueuePolicy::Wait)
        .unwrap();
    let mut outcome = None;
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            edgerun_engine::GenerationEvent::FormatUnmet(why) => outcome = Some(Ok(why)),
            edgerun_engine::GenerationEvent::Failed(why) => outcome = Some(Err(why)),
            edgerun_engine::GenerationEvent::Finished { reason, .. } => {
                outcome = Some(Err(format!("finished: {reason:?}")))
            }
            _ => {}
        }
    }
    let why = outcome.expect("an end").expect("FormatUnmet");
    assert!(why.len() < 400 && !why.contains('\n'), "{why}");
    assert_eq!(engine.stats().sequences_failed_total, 0);
}
