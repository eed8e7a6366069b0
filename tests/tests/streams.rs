//! What a client sees of the node beyond the answers themselves, end to end on the real binary
//! and model: keep-alives while a stream's text is held back.

use edgerun_e2e::{read_sse, Node, Received, MODEL_ALIAS};
use edgerun_protocol::sse::SseEvent;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Parameters no short call satisfies: 250 digits, so a forced call takes a few seconds to
/// generate on the CPU (SmolLM2 writes each digit and its comma as tokens of their own).
fn digits_parameters() -> Value {
    json!({"type": "object",
           "properties": {"digits": {"type": "array",
                                     "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "minItems": 250, "maxItems": 250}},
           "required": ["digits"], "additionalProperties": false})
}

const ASK: &str = "Write down 250 random digits.";

/// The largest gap between consecutive events, and between the headers and the first event.
fn largest_gap(events: &[Received]) -> Duration {
    let mut last = Duration::ZERO;
    let mut gap = Duration::ZERO;
    for r in events {
        gap = gap.max(r.at.saturating_sub(last));
        last = r.at;
    }
    gap
}

fn comments(events: &[Received]) -> usize {
    events
        .iter()
        .filter(|r| matches!(r.event, SseEvent::Comment(_)))
        .count()
}

/// A forced tool call is held back whole until the end, yet the stream is never silent for
/// longer than the heartbeat interval (finding 3 of issue 21: it was silent until the call
/// ended, because every engine token restarted the heartbeat timer); on `/v1` the role chunk
/// comes first, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_tool_calls_still_get_keep_alives_at_the_interval() {
    let node = Node::start(&["--heartbeat-secs", "1"]).await;
    let interval = Duration::from_secs(1);
    // One interval plus generous slack for a loaded 2-core VM (the bug was whole seconds).
    let bound = interval + Duration::from_millis(900);
    let openai = json!({
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": ASK}],
        "tools": [{"type": "function", "function": {
            "name": "record_digits", "description": "Records digits",
            "parameters": digits_parameters()}}],
        "tool_choice": {"type": "function", "function": {"name": "record_digits"}},
        "stream": true, "temperature": 0, "max_tokens": 1200,
    });
    let workers_ai = json!({
        "messages": [{"role": "user", "content": ASK}],
        "tools": [{"name": "record_digits", "description": "Records digits",
                   "parameters": digits_parameters()}],
        "tool_choice": "required",
        "stream": true, "temperature": 0, "max_tokens": 1200,
    });
    for (path, body) in [
        ("/v1/chat/completions".to_string(), openai),
        (format!("/run/{MODEL_ALIAS}"), workers_ai),
    ] {
        let resp = node.post_json_to(&path, &body).await;
        assert_eq!(resp.status(), 200, "{path}");
        // Timed from the headers: the first-event grace (1 s) may hold them back.
        let events = read_sse(resp, Instant::now()).await;
        let last = events.last().unwrap_or_else(|| panic!("{path}: no events"));
        assert!(matches!(last.event, SseEvent::Done), "{path}: {events:?}");
        let calls: Vec<&Value> = events
            .iter()
            .filter_map(|r| match &r.event {
                SseEvent::Data(v) => Some(v),
                _ => None,
            })
            .filter(|v| {
                v.get("tool_calls").is_some()
                    || v["choices"][0]["delta"].get("tool_calls").is_some()
            })
            .collect();
        assert_eq!(calls.len(), 1, "{path}: the call went out once: {events:?}");
        // Meaningful only if the call took several intervals to generate.
        assert!(
            last.at > 3 * interval,
            "{path}: the call took only {:?}; the test needs a longer one",
            last.at
        );
        let gap = largest_gap(&events);
        assert!(
            gap <= bound,
            "{path}: {gap:?} without a byte (heartbeat every {interval:?}): {:?}",
            events.iter().map(|r| r.at).collect::<Vec<_>>()
        );
        assert!(comments(&events) >= 2, "{path}: {events:?}");
        if path.starts_with("/v1/") {
            let SseEvent::Data(first) = &events[0].event else {
                panic!("{path}: the stream does not open with the role chunk: {events:?}");
            };
            assert_eq!(
                first["choices"][0]["delta"],
                json!({"role": "assistant", "content": ""}),
                "{path}"
            );
            assert!(
                events[0].at < Duration::from_millis(500),
                "{path}: the role chunk came {:?} after the headers",
                events[0].at
            );
        }
    }
}
