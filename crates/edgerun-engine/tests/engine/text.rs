//! Tokenizer, incremental detokenization and chat templates on the real model's metadata.

use crate::harness;

use edgerun_engine::{ChatMessage, ChatTemplate, IncrementalDecoder, PromptInput};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        tool_call_id: None,
        tool_calls: None,
        name: None,
    }
}

const SAMPLES: &[&str] = &[
    "Hello, world!",
    "emoji: 🦀🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "CJK: 東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "code:\nfn main() {\n    println!(\"{}\", 1 + 2);\n}\n\tlet x = [1, 2, 3];",
    "runs of spaces:    four,        eight, and a tab\t\tdouble",
    "trailing newlines\n\n\n",
    "  leading spaces and numbers 1234567890 3.14159 -42",
    "accents: naïve café résumé Ångström, and RTL: שלום مرحبا",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
];

#[test]
fn tokenizer_round_trips_text() {
    let loaded = harness::load();
    let tok = &loaded.tokenizer;
    for s in SAMPLES {
        let ids = tok.encode(s).unwrap();
        assert!(!ids.is_empty());
        // Special tokens are dropped when decoding output, so compare without them.
        let expected = s.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(tok.decode(&ids).unwrap(), expected, "{s:?} -> {ids:?}");
    }
}

/// Token ids as llama.cpp produces them for the same GGUF (fixture generated with llama-server's
/// `/tokenize`; see its `source`). Round trips alone would pass for any split of the text.
#[test]
fn token_ids_match_llama_cpp() {
    let loaded = harness::load();
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/smollm2_llama_cpp_tokens.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(loaded.tokenizer.encode(text).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn a_tokenizer_json_can_replace_the_gguf_tokenizer() {
    let loaded = harness::load();
    let dir = std::env::temp_dir().join(format!("edgerun-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    loaded
        .tokenizer
        .hf_tokenizer()
        .unwrap()
        .save(&json, false)
        .unwrap();
    let from_json = edgerun_engine::LoadedModel::load(
        &harness::model_path(),
        Some(&json),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .tokenizer;
    for s in SAMPLES {
        assert_eq!(
            from_json.encode(s).unwrap(),
            loaded.tokenizer.encode(s).unwrap(),
            "{s:?}"
        );
    }
    assert_eq!(from_json.stop_ids(), loaded.tokenizer.stop_ids());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn special_tokens_and_digits_follow_the_model() {
    let loaded = harness::load();
    let tok = &loaded.tokenizer;
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
    assert_eq!(ids.first(), Some(&tok.token_to_id("<|im_start|>").unwrap()));
    assert_eq!(ids.last(), Some(&tok.token_to_id("<|im_end|>").unwrap()));
    // SmolLM2's pre-tokenizer (`smollm`) splits digits one by one.
    assert_eq!(tok.encode("12345").unwrap().len(), 5);
    // End-of-turn tokens stop generation: the metadata's EOS and ChatML's terminators.
    let stops = tok.stop_ids();
    assert!(stops.contains(&tok.token_to_id("<|im_end|>").unwrap()));
    assert!(stops.contains(&tok.token_to_id("<|endoftext|>").unwrap()));
    assert!(!stops.contains(&tok.token_to_id("<|im_start|>").unwrap()));
}

#[test]
fn incremental_decoding_never_splits_a_character_and_holds_nothing_back() {
    let loaded = harness::load();
    let tok = &loaded.tokenizer;
    for s in SAMPLES.iter().filter(|s| !s.contains("<|")) {
        let ids = tok.encode(s).unwrap();
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            if let Some(delta) = dec.push(tok, id).unwrap() {
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{s:?}: partial character emitted"
                );
                out.push_str(&delta);
            }
            // Whatever has been released is exactly the decode of the tokens so far, unless
            // those end inside a character.
            let so_far = tok.decode(&ids[..=i]).unwrap();
            if !so_far.ends_with('\u{FFFD}') {
                assert_eq!(out, so_far, "{s:?}: text held back after token {i}");
            }
        }
        if let Some(rest) = dec.flush(tok).unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, *s);
    }
}

#[test]
fn the_models_own_chat_template_renders_messages() {
    let loaded = harness::load();
    let t = &loaded.template;
    let text = t.render(&[msg("user", "Hi there")], None).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = t
        .render(
            &[
                msg("system", "Be terse."),
                msg("user", "2+2?"),
                msg("assistant", "4"),
                msg("tool", "{\"result\": 4}"),
                msg("user", "thanks"),
            ],
            None,
        )
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\nBe terse.<|im_end|>\n"));
    assert!(text.contains("<|im_start|>tool\n{\"result\": 4}<|im_end|>\n"));
    assert!(text.ends_with("<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n"));
    // A prompt is one user message; raw skips the template.
    let prompt = PromptInput::Prompt {
        text: "Hi there".into(),
        raw: false,
    };
    assert_eq!(
        t.render_input(&prompt, None).unwrap(),
        t.render(&[msg("user", "Hi there")], None).unwrap()
    );
    let raw = PromptInput::Prompt {
        text: "Once upon".into(),
        raw: true,
    };
    assert_eq!(t.render_input(&raw, None).unwrap(), "Once upon");
}

/// Meta-Llama-3-8B-Instruct's template (tokenizer_config.json), plus the helpers real templates
/// call: Python string methods, raise_exception, strftime_now and tojson.
#[test]
fn llama3_style_templates_and_python_helpers() {
    let llama3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    let t = ChatTemplate::new(llama3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
    let out = t
        .render(&[msg("system", " sys "), msg("user", "hello")], None)
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    let helpers = "{{ messages[0]['content'].strip().upper() }}|{{ messages[0]['content'].startswith(' a') }}|{{ strftime_now('%Y') | length }}|{{ tools | tojson }}|{% if messages[-1]['role'] != 'user' %}{{ raise_exception('last message must be from the user') }}{% endif %}";
    let t = ChatTemplate::new(helpers, None, None).unwrap();
    let tools = serde_json::json!([{"name": "get_weather"}]);
    let out = t.render(&[msg("user", " abc ")], Some(&tools)).unwrap();
    // `tojson` writes what Python's json.dumps writes (", " and ": " between items).
    assert_eq!(out, "ABC|True|4|[{\"name\": \"get_weather\"}]|");
    let err = t.render(&[msg("assistant", "x")], None).unwrap_err();
    assert!(
        err.to_string()
            .contains("last message must be from the user"),
        "{err}"
    );
}
