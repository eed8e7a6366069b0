//! llama.cpp's tokenizer test vectors (the pinned sdist's `models/ggml-vocab-*.gguf` with their
//! `.inp`/`.out` files: `scripts/fetch-llama-cpp-sdist.sh --vocab`): every vocabulary whose
//! tokenizer the engine builds from GGUF metadata must give llama.cpp's ids for every vector,
//! token for token (`test-tokenizer-0`'s contract: no BOS, specials in the text read as text);
//! every other vocabulary must be refused at load with its type named. Which is which is
//! pinned below, so that support gained or lost shows here.

use candle_core::quantized::gguf_file;
use edgerun_engine::TextTokenizer;
use std::path::{Path, PathBuf};

/// The vocabularies with test vectors that load, and those refused (with what the refusal
/// must name). Baichuan, GPT-NeoX and nomic-bert-moe ship without vectors. Refused: BERT's
/// WordPiece (`bert`: the embedding models read `tokenizer.json` instead) and Gemma 4's
/// byte-fallback BPE over raw UTF-8 (`gemma4`), no architecture of which the node serves.
const SUPPORTED: &[&str] = &[
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
];
const REFUSED: &[(&str, &str)] = &[("bert-bge", "`bert`"), ("gemma-4", "`gemma4`")];

/// `(text, ids)` pairs as `test-tokenizer-0.cpp` reads them: inputs separated by
/// `\n__ggml_vocab_test__\n`, one line of space-separated ids per input.
fn vectors(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts: Vec<String> = inp.split(sep).map(str::to_string).collect();
    // A trailing separator leaves nothing after it, which C++'s loop does not count.
    if inp.ends_with(sep) {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("an id"))
                .collect()
        })
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}", gguf.display());
    texts.into_iter().zip(ids).collect()
}

#[test]
fn every_supported_vocabulary_matches_llama_cpp_token_for_token() {
    let dir = crate::harness::sdist_dir("--vocab");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| p.with_extension("gguf.inp").is_file())
        .collect();
    files.sort();
    let mut supported = vec![];
    let mut refused = vec![];
    let mut failures = vec![];
    for file in &files {
        let name = file
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("ggml-vocab-")
            .to_string();
        let ct = gguf_file::Content::read(&mut std::fs::File::open(file).unwrap()).unwrap();
        let tokenizer = match TextTokenizer::from_gguf(&ct) {
            Ok(t) => t,
            Err(e) => {
                refused.push((name, e.to_string()));
                continue;
            }
        };
        let cases = vectors(file);
        let mut wrong = 0;
        for (text, want) in &cases {
            let got = tokenizer.encode_text_only(text).unwrap();
            if &got != want {
                wrong += 1;
                if wrong <= 3 {
                    failures.push(format!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}"));
                }
            }
        }
        if wrong > 0 {
            failures.push(format!("{name}: {wrong} of {} vectors differ", cases.len()));
        }
        eprintln!("{name}: {} vectors, {wrong} differ", cases.len());
        supported.push(name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(supported, SUPPORTED, "refused: {refused:?}");
    assert_eq!(refused.len(), REFUSED.len(), "{refused:?}");
    for ((name, why), (want_name, named)) in refused.iter().zip(REFUSED) {
        assert_eq!(name, want_name, "{refused:?}");
        assert!(
            why.contains(named),
            "{name} refused without naming {named}: {why}"
        );
    }
}

/// A rendered Phi-3 prompt: its special tokens are tokens, and (llama.cpp's rule for Phi-3,
/// by `general.name`) the newline after each is dropped, so the text after `<|user|>` starts
/// a word: `<s>`, `<|user|>`, `▁Hi`, `<|end|>`, `<|assistant|>`.
#[test]
fn phi3_special_tokens_take_the_whitespace_after_them() {
    let file = crate::harness::sdist_dir("--vocab").join("ggml-vocab-phi-3.gguf");
    let ct = gguf_file::Content::read(&mut std::fs::File::open(&file).unwrap()).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&ct).unwrap();
    let ids = tokenizer
        .encode("<|user|>\nHi<|end|>\n<|assistant|>\n")
        .unwrap();
    assert_eq!(ids, [1, 32010, 6324, 32007, 32001]);
    // As text (specials not parsed), nothing is stripped.
    let text = tokenizer.encode_text_only("<|end|>\nHi").unwrap();
    assert!(text.contains(&13), "the newline stays: {text:?}");
}

/// A llama-shaped model with a SentencePiece vocabulary (random weights, llama.cpp's
/// `ggml-vocab-llama-spm.gguf` tokenizer, as Llama-2 and Mistral ship it) loads from the GGUF
/// alone and generates; a JSON schema constrains it (the grammar's token table is built from the
/// pieces' bytes), and its streamed text is pieces decoded (no `▁`, no `<0x..>`).
#[test]
fn a_sentencepiece_model_loads_from_its_gguf_and_generates_under_a_schema() {
    use edgerun_engine::gguf::{self, Scheme};
    use edgerun_engine::{
        Engine, GenerationRequest, LoadedModel, OutputFormat, PromptInput, QueuePolicy,
        SamplingConfig, SchedulerConfig, StopCriteria,
    };
    let vocab = crate::harness::sdist_dir("--vocab").join("ggml-vocab-llama-spm.gguf");
    let out = std::env::temp_dir().join(format!("edgerun-spm-{}.gguf", std::process::id()));
    let shape = crate::harness::small_shape();
    gguf::generate("spm-small", &shape, Scheme::Q8_0, &vocab, 3, &out).unwrap();
    let loaded = LoadedModel::load(&out, None, &candle_core::Device::Cpu).unwrap();
    let tokenizer = &loaded.tokenizer;
    assert!(tokenizer.hf_tokenizer().is_none(), "read natively");
    assert_eq!(tokenizer.bos_token(), Some("<s>"));
    assert!(tokenizer.stop_ids().contains(&2), "</s> ends a generation");
    // BOS, then " Hello world" with the leading space.
    let ids = tokenizer.encode("Hello world").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tokenizer.decode(&ids).unwrap(), " Hello world");
    let engine = Engine::start(loaded, SchedulerConfig::default(), None).unwrap();
    let input = PromptInput::Prompt {
        text: "[INST] Name a city. [/INST]".into(),
        raw: true,
    };
    let free = GenerationRequest::new(
        engine.prepare(&input, &[]).unwrap(),
        SamplingConfig::GREEDY,
        StopCriteria::max_tokens(24),
    );
    let (text, n) = crate::harness::collect(engine.submit(free, QueuePolicy::Wait).unwrap());
    assert!(n > 0);
    assert!(
        !text.contains('\u{2581}') && !text.contains("<0x"),
        "undecoded pieces: {text:?}"
    );
    let schema = OutputFormat::JsonSchema(serde_json::json!({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": false
    }));
    let mut constrained = GenerationRequest::new(
        engine.prepare(&input, &[]).unwrap(),
        SamplingConfig::GREEDY,
        StopCriteria::max_tokens(64),
    );
    constrained.constraint = engine.constrain(&schema).unwrap();
    let (json, _) = crate::harness::collect(engine.submit(constrained, QueuePolicy::Wait).unwrap());
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json:?}"));
    assert!(v["city"].is_string(), "{json}");
    let _ = std::fs::remove_file(&out);
}
