//! Every chat template of llama.cpp's test set (the pinned sdist's `models/templates/*.jinja`)
//! renders what Python's Jinja2 renders, as Hugging Face transformers sets it up, for a fixed
//! set of conversations — or raises where Jinja2 raised. The expected texts are test data made
//! once by `scripts/make-template-renders.py` (Jinja2 3.1.6, the clock fixed).

use chrono::TimeZone;
use edgerun_engine::{ChatMessage, ChatTemplate};
use serde_json::Value;
use std::path::PathBuf;

fn message(v: &Value) -> ChatMessage {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    ChatMessage {
        role: s("role").unwrap(),
        content: s("content").unwrap_or_default(),
        tool_call_id: s("tool_call_id"),
        tool_calls: v.get("tool_calls").cloned(),
        name: s("name"),
    }
}

/// Where the first difference is, with some context on each side.
fn first_difference(want: &str, got: &str) -> String {
    let at = want
        .char_indices()
        .zip(got.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(want.len().min(got.len()));
    let from = want[..at]
        .char_indices()
        .rev()
        .nth(40)
        .map_or(0, |(i, _)| i);
    let cut = |s: &str| {
        s.get(from..)
            .unwrap_or("")
            .chars()
            .take(120)
            .collect::<String>()
    };
    format!(
        "at byte {at}\n    want {:?}\n    got  {:?}",
        cut(want),
        cut(got)
    )
}

/// Where the node knowingly differs from Jinja2, and why; each must still differ in just this
/// way (so that the list cannot go stale). All three are Python behaviours minijinja cannot
/// take on without changing its operators, and in each the node renders a usable prompt where
/// transformers fails or garbles it.
const KNOWN: &[(&str, &str, &str)] = &[
    // `{% for tool in tools %}` with tools=None (transformers passes None when a request has no
    // tools): Python raises "'NoneType' object is not iterable"; minijinja loops zero times.
    (
        "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
        "user",
        "NoneType",
    ),
    (
        "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
        "system",
        "NoneType",
    ),
    (
        "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
        "multi_turn",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
        "user",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
        "system",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
        "multi_turn",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "user",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "system",
        "NoneType",
    ),
    (
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "multi_turn",
        "NoneType",
    ),
    // `tools | map(attribute='function') | tojson`: Jinja2's map is a generator that
    // json.dumps cannot serialize; minijinja's is a list.
    ("llama-cpp-deepseek-r1.jinja", "tools_offered", "generator"),
    ("llama-cpp-deepseek-r1.jinja", "tool_result", "generator"),
    // `"..."|safe + t | tojson()`: Python's Markup escapes what is added to it, so Jinja2
    // writes the tool's JSON as `{&#34;name&#34;: ...}`; minijinja concatenates plainly.
    (
        "meetkai-functionary-medium-v3.1.jinja",
        "tools_offered",
        "&#34;",
    ),
    (
        "meetkai-functionary-medium-v3.1.jinja",
        "tool_result",
        "&#34;",
    ),
];

#[test]
fn every_template_renders_as_jinja2_does() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/data/template-renders.json")).unwrap(),
    )
    .unwrap();
    let now = chrono::Utc
        .with_ymd_and_hms(2026, 1, 15, 10, 30, 0)
        .unwrap();
    assert_eq!(data["now"], "2026-01-15T10:30:00");
    let bos = data["bos_token"].as_str().unwrap();
    let eos = data["eos_token"].as_str().unwrap();
    let dir = crate::harness::sdist_dir("--templates");
    let renders = data["renders"].as_object().unwrap();
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jinja")
        })
        .count();
    assert_eq!(
        renders.len(),
        on_disk,
        "a template without expected renders"
    );
    let mut failures = vec![];
    let mut compared = 0;
    for (file, expected) in renders {
        let source = std::fs::read_to_string(dir.join(file)).unwrap();
        let template = ChatTemplate::new(&source, Some(bos), Some(eos));
        for (name, want) in expected.as_object().unwrap() {
            let conv = &data["conversations"][name];
            let messages: Vec<ChatMessage> = conv["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(message)
                .collect();
            let tools = conv.get("tools");
            let got = template.as_ref().map_err(|e| e.to_string()).and_then(|t| {
                t.render_at(&messages, tools, now)
                    .map_err(|e| e.to_string())
            });
            compared += 1;
            if let Some((_, _, mark)) = KNOWN.iter().find(|(f, c, _)| f == file && c == name) {
                let differs_so = match (want.get("text").and_then(Value::as_str), &got) {
                    (None, Ok(_)) => want["error"].as_str().unwrap().contains(mark),
                    (Some(w), Ok(g)) => w.contains(mark) && w != g,
                    _ => false,
                };
                if !differs_so {
                    failures.push(format!("{file} / {name}: no longer the known difference"));
                }
                continue;
            }
            match (want.get("text").and_then(Value::as_str), got) {
                (Some(w), Ok(g)) if w == g => {}
                (Some(w), Ok(g)) => {
                    failures.push(format!("{file} / {name}: {}", first_difference(w, &g)))
                }
                (Some(_), Err(e)) => failures.push(format!("{file} / {name}: raised {e}")),
                (None, Ok(_)) => failures.push(format!(
                    "{file} / {name}: rendered, but Jinja2 raised {}",
                    want["error"]
                )),
                (None, Err(_)) => {}
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} renders differ from Jinja2's:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
