//! Tokenizers built from GGUF metadata (or a `tokenizer.json`), and incremental detokenization.
//!
//! Two kinds come from the metadata alone: byte-level BPE (`tokenizer.ggml.model = gpt2`:
//! Llama-3, Qwen2, SmolLM, GPT-2 and kin) through the `tokenizers` crate with the
//! pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, and SentencePiece
//! (`tokenizer.ggml.model = llama`: Llama-2, Mistral, Phi-3) in [`spm`], llama.cpp's algorithm
//! over the pieces and scores. Anything else is refused at load, its type named.

pub(crate) mod spm;

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;
use spm::SpmVocab;
use std::collections::BTreeSet;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Llama-3's pre-tokenizer split (tokenizer.json of Meta-Llama-3-8B-Instruct).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: like Llama-3's but digits one at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn in common chat formats. Any of them present in a model's vocabulary
/// stops generation, on top of the metadata's EOS: a GGUF often names only one terminator
/// (Llama-3 Instruct's EOS is `<|end_of_text|>` or `<|eot_id|>` depending on the converter).
const KNOWN_TERMINATORS: &[&str] = &[
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// A model's tokenizer plus what the engine needs to know about its special tokens.
pub struct TextTokenizer {
    inner: Inner,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    add_bos: bool,
    stop_ids: BTreeSet<u32>,
}

/// The vocabulary behind a [`TextTokenizer`].
enum Inner {
    /// Byte-level BPE from the metadata, or any `tokenizer.json`.
    Hf(Box<Tokenizer>),
    /// SentencePiece from the metadata.
    Spm(Box<SpmVocab>),
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    let v = ct.metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_i32().ok().map(|x| x as u32))
        .or_else(|| v.to_u64().ok().map(|x| x as u32))
}

fn meta_str_array(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| EngineError::Tokenizer(format!("GGUF metadata has no `{key}`")))?;
    let arr = v
        .to_vec()
        .map_err(|_| EngineError::Tokenizer(format!("`{key}` is not an array")))?;
    arr.iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| EngineError::Tokenizer(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// GPT-2's split (also MPT's, and StarCoder's after its digits).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

// The regex lists below are llama.cpp's (`llm_tokenizer_bpe`, src/llama-vocab.cpp at the pinned
// commit), applied in order, each to the pieces the one before left.
const DEEPSEEK_LLM_SPLITS: &[&str] = &[
    r#"[\r\n]"#,
    r#"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"#,
    r#"\s?[!-/:-~！-／：-～‘-‟　-。]+"#,
    r#"\s+$"#,
    r#"[一-龥ࠀ-一가-퟿]+"#,
    r#"\p{N}+"#,
];
const DEEPSEEK_CODER_SPLITS: &[&str] = &[
    r#"[\r\n]"#,
    r#"\s?\p{L}+"#,
    r#"\s?\p{P}+"#,
    r#"[一-龥ࠀ-一가-퟿]+"#,
    r#"\p{N}"#,
];
const FALCON_SPLITS: &[&str] = &[
    r#"[\p{P}\$\+<=>\^~\|`]+"#,
    r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#,
    r#"[0-9][0-9][0-9]"#,
];
const QWEN35_SPLITS: &[&str] = &[
    r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
];

/// The pre-tokenizer llama.cpp applies for a `tokenizer.ggml.pre` name: its regexes in order,
/// each splitting what the one before left (matches and the text between them both kept),
/// then GPT-2's byte-level alphabet.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let splits: &[&str] = match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "lfm2" | "dbrx" => &[LLAMA3_SPLIT],
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => &[QWEN2_SPLIT],
        "qwen35" => QWEN35_SPLITS,
        "smollm" | "starcoder" | "refact" | "command-r" => &[r"\p{N}", GPT2_SPLIT],
        "gpt2" | "default" | "gpt-2" | "mpt" | "olmo" | "phi-2" => &[GPT2_SPLIT],
        "deepseek-llm" => DEEPSEEK_LLM_SPLITS,
        "deepseek-coder" => DEEPSEEK_CODER_SPLITS,
        "falcon" => FALCON_SPLITS,
        other => {
            return Err(EngineError::Tokenizer(format!(
                "unsupported tokenizer.ggml.pre `{other}` (supported: llama3/llama-bpe, \
                 qwen2, qwen35, smollm, starcoder, refact, command-r, gpt2, mpt, olmo, \
                 deepseek-llm, deepseek-coder, falcon); pass --tokenizer with the model's \
                 tokenizer.json"
            )))
        }
    };
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(splits.len() + 1);
    for re in splits {
        steps.push(
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?
            .into(),
        );
    }
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(steps).into())
}

impl TextTokenizer {
    /// Builds the byte-level BPE tokenizer described by the `tokenizer.ggml.*` metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let kind = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        match kind.as_str() {
            "gpt2" => {}
            "llama" => return Self::spm_from_gguf(ct),
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "tokenizer.ggml.model `{other}` is not supported (supported: `gpt2`, byte-level \
                     BPE; `llama`, SentencePiece); pass --tokenizer with the model's tokenizer.json"
                )))
            }
        }
        let tokens = meta_str_array(ct, "tokenizer.ggml.tokens")?;
        let merges = meta_str_array(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let meta_bool = |key: &str| ct.metadata.get(key).and_then(|v| v.to_bool().ok());
        // llama.cpp's vocabulary loader is the reference for what a missing key means.
        let pre = match ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
        {
            Some(pre) => pre,
            // Early Llama-3 conversions predate the key.
            None if tokens.iter().any(|t| t == "<|begin_of_text|>") => {
                tracing::warn!("GGUF has no tokenizer.ggml.pre; the vocabulary is Llama-3's, using its pre-tokenizer");
                "llama3".into()
            }
            None => {
                tracing::warn!("GGUF has no tokenizer.ggml.pre; using GPT-2's pre-tokenizer");
                "gpt2".into()
            }
        };
        let llama3_family = matches!(pre.as_str(), "llama3" | "llama-bpe" | "llama-v3");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama-3's tokenizer.json has `ignore_merges: true` (whole-word vocabulary entries
            // win over merges); llama.cpp applies the same for its llama3 pre-tokenizers.
            .ignore_merges(meta_bool("tokenizer.ggml.ignore_merges").unwrap_or(llama3_family))
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens (type 3) are matched whole in input text, so a chat template's
        // `<|im_start|>` becomes one token, and are dropped when decoding output. User-defined
        // tokens (type 4, e.g. `<think>`) are matched whole too but are ordinary text in output.
        let types = token_types(ct);
        let of_type = |ty: u32| -> Vec<AddedToken> {
            types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == ty)
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), ty == 3))
                .collect()
        };
        inner.add_special_tokens(of_type(3)).map_err(tok_err)?;
        inner.add_tokens(of_type(4)).map_err(tok_err)?;
        let is_control = |id: u32| types.get(id as usize) == Some(&3);

        let named = |key: &str| {
            meta_u32(ct, key).and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        let bos = named("tokenizer.ggml.bos_token_id");
        let eos = named("tokenizer.ggml.eos_token_id");
        let add_bos = meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(llama3_family);
        let mut stop_ids: BTreeSet<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| meta_u32(ct, &format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        // Known terminators count only as control tokens: in some vocabularies `</s>` or
        // `<|endoftext|>` is ordinary text, and must not end a generation.
        stop_ids.extend(
            KNOWN_TERMINATORS
                .iter()
                .filter_map(|t| inner.token_to_id(t))
                .filter(|&id| is_control(id)),
        );
        Ok(Self {
            inner: Inner::Hf(Box::new(inner)),
            bos,
            eos,
            add_bos,
            stop_ids,
        })
    }

    /// A SentencePiece vocabulary from `tokenizer.ggml.{tokens,scores,token_type}` and its
    /// flags (`add_space_prefix`, `add_bos_token`: on unless the metadata says otherwise, as
    /// llama.cpp reads them); the special ids as for BPE.
    fn spm_from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let tokens = meta_str_array(ct, "tokenizer.ggml.tokens")?;
        let scores: Vec<f32> = ct
            .metadata
            .get("tokenizer.ggml.scores")
            .ok_or_else(|| {
                EngineError::Tokenizer(
                    "a SentencePiece vocabulary without `tokenizer.ggml.scores`".into(),
                )
            })?
            .to_vec()
            .map_err(|_| EngineError::Tokenizer("`tokenizer.ggml.scores` is not an array".into()))?
            .iter()
            .map(|v| {
                v.to_f32().map_err(|_| {
                    EngineError::Tokenizer("`tokenizer.ggml.scores` holds a non-f32".into())
                })
            })
            .collect::<Result<_>>()?;
        let meta_bool = |key: &str| -> Result<Option<bool>> {
            match ct.metadata.get(key) {
                None => Ok(None),
                Some(v) => v
                    .to_bool()
                    .map(Some)
                    .map_err(|_| EngineError::Tokenizer(format!("`{key}` is not a bool"))),
            }
        };
        let add_space_prefix = meta_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        let add_bos = meta_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
        let types = token_types(ct);
        let unknown = meta_u32(ct, "tokenizer.ggml.unknown_token_id")
            .or_else(|| tokens.iter().position(|t| t == "<unk>").map(|i| i as u32));
        // llama.cpp drops whitespace after Phi-3's special tokens, recognising the model by name.
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .map(|n| n.to_lowercase())
            .unwrap_or_default();
        let phi3 = name.contains("phi3") || name.contains("phi-3");
        let vocab = SpmVocab::new(
            tokens.clone(),
            scores,
            types,
            add_space_prefix,
            unknown,
            phi3,
        )
        .map_err(EngineError::Tokenizer)?;
        let named = |key: &str| {
            meta_u32(ct, key).and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        let mut stop_ids: BTreeSet<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| meta_u32(ct, &format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        stop_ids.extend(KNOWN_TERMINATORS.iter().filter_map(|t| {
            vocab
                .id(t)
                .filter(|&id| vocab.token_type(id) == Some(spm::token_type::CONTROL))
        }));
        Ok(Self {
            bos: named("tokenizer.ggml.bos_token_id"),
            eos: named("tokenizer.ggml.eos_token_id"),
            add_bos,
            stop_ids,
            inner: Inner::Spm(Box::new(vocab)),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`; special-token facts still come from the GGUF.
    pub fn from_file(path: &std::path::Path, ct: &gguf_file::Content) -> Result<Self> {
        let mut this = Self::from_gguf_specials_only(ct)?;
        let json = Tokenizer::from_file(path).map_err(tok_err)?;
        let special: BTreeSet<u32> = json
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        this.stop_ids.extend(
            KNOWN_TERMINATORS
                .iter()
                .filter_map(|t| json.token_to_id(t))
                .filter(|id| special.contains(id)),
        );
        this.inner = Inner::Hf(Box::new(json));
        Ok(this)
    }

    fn from_gguf_specials_only(ct: &gguf_file::Content) -> Result<Self> {
        let tokens = meta_str_array(ct, "tokenizer.ggml.tokens").unwrap_or_default();
        let named = |key: &str| {
            meta_u32(ct, key).and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        Ok(Self {
            inner: Inner::Hf(Box::new(Tokenizer::new(BPE::default()))),
            bos: named("tokenizer.ggml.bos_token_id"),
            eos: named("tokenizer.ggml.eos_token_id"),
            add_bos: ct
                .metadata
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or_else(|| tokens.iter().any(|t| t == "<|begin_of_text|>")),
            stop_ids: ["eos", "eot", "eom"]
                .iter()
                .filter_map(|k| meta_u32(ct, &format!("tokenizer.ggml.{k}_token_id")))
                .collect(),
        })
    }

    /// Tokenizes prompt text. Special tokens written in the text are recognised. The BOS token
    /// is prepended when the model asks for it and the text does not already start with it
    /// (Llama-3's chat template writes it itself).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Inner::Hf(t) => hf_ids(t, text)?,
            Inner::Spm(v) => v.encode(text, true, true).map_err(EngineError::Tokenizer)?,
        };
        if self.add_bos {
            if let Some((bos, _)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    /// Tokenizes text as it is, as a piece of a longer sequence: no BOS and (SentencePiece) no
    /// leading space added, but special tokens written in it are still recognised.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => hf_ids(t, text),
            Inner::Spm(v) => v.encode(text, true, false).map_err(EngineError::Tokenizer),
        }
    }

    /// What llama.cpp's tokenizer gives for `text` with `add_special` and `parse_special` off
    /// (its `test-tokenizer-0`, the contract of the vocabulary test vectors): no BOS, control
    /// tokens written in the text read as text.
    pub fn encode_text_only(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => hf_ids(t, text),
            Inner::Spm(v) => v.encode(text, false, true).map_err(EngineError::Tokenizer),
        }
    }

    /// Ids of the special (control) tokens: dropped from decoded text, never text themselves.
    pub fn special_ids(&self) -> BTreeSet<u32> {
        match &self.inner {
            Inner::Hf(t) => t
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special)
                .map(|(id, _)| id)
                .collect(),
            Inner::Spm(v) => v.control_ids().collect(),
        }
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, true).map_err(tok_err),
            Inner::Spm(v) => Ok(v.decode(ids, true)),
        }
    }

    /// Token ids that end generation.
    pub fn stop_ids(&self) -> &BTreeSet<u32> {
        &self.stop_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Hf(t) => t.get_vocab_size(true),
            Inner::Spm(v) => v.len(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Spm(v) => v.id(token),
        }
    }

    /// The bytes token `id` stands for, as OpenAI's logprobs report them: a byte-level BPE
    /// piece or a SentencePiece byte token may be part of a UTF-8 character, so these need not
    /// be valid UTF-8. Special and added tokens are their text. Unknown ids are empty.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let inner = match &self.inner {
            Inner::Hf(t) => t,
            Inner::Spm(v) => return v.token_bytes(id, true),
        };
        if let Some(added) = inner.get_added_vocabulary().simple_id_to_token(id) {
            return added.into_bytes();
        }
        if let Some(bytes) = inner
            .id_to_token(id)
            .and_then(|piece| byte_level_bytes(&piece))
        {
            return bytes;
        }
        inner
            .decode(&[id], false)
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    /// The underlying Hugging Face tokenizer (for example to save it as `tokenizer.json`);
    /// `None` for a SentencePiece vocabulary, which is read natively.
    pub fn hf_tokenizer(&self) -> Option<&Tokenizer> {
        match &self.inner {
            Inner::Hf(t) => Some(t),
            Inner::Spm(_) => None,
        }
    }
}

/// `text`'s ids from a `tokenizers` tokenizer, added tokens matched, nothing added.
fn hf_ids(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(t.encode_fast(text, false)
        .map_err(tok_err)?
        .get_ids()
        .to_vec())
}

/// `tokenizer.ggml.token_type`, one per token (empty when absent).
fn token_types(ct: &gguf_file::Content) -> Vec<u32> {
    ct.metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|a| {
            a.iter()
                .map(|v| {
                    v.to_i32()
                        .map(|x| x as u32)
                        .or_else(|_| v.to_u32())
                        .unwrap_or(1)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether GPT-2's byte-level alphabet writes byte `b` as the character of the same code.
fn byte_is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The bytes of a byte-level BPE piece (GPT-2's `bytes_to_unicode` read backwards: printable
/// bytes are their own character, the others are 256 + their rank among the others), or
/// `None` when `piece` is not written in that alphabet.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece
        .chars()
        .map(|c| match u32::from(c) {
            code @ 0..=255 => u8::try_from(code).ok().filter(|&b| byte_is_printable(b)),
            code @ 256..=511 => (0..=255u8)
                .filter(|&b| !byte_is_printable(b))
                .nth((code - 256) as usize),
            _ => None,
        })
        .collect()
}

/// Turns a stream of token ids into a stream of text deltas.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character (emoji, CJK). Text is
/// released as soon as it decodes to whole characters, and held back only while it ends in an
/// incomplete one; nothing is held for word boundaries.
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let delta = match full.strip_prefix(prefix.as_str()) {
            Some(d) => d.to_string(),
            // Decoders that rewrite earlier text: emit what follows the common prefix.
            None => {
                let common = prefix
                    .char_indices()
                    .zip(full.chars())
                    .find(|((_, a), b)| a != b)
                    .map(|((i, _), _)| i)
                    .unwrap_or(prefix.len().min(full.len()));
                full[common..].to_string()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok((!delta.is_empty()).then_some(delta))
    }

    /// Releases whatever is still held back (an incomplete character at the end of generation).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        let delta = full
            .strip_prefix(prefix.as_str())
            .unwrap_or(&full)
            .to_string();
        Ok((!delta.is_empty()).then_some(delta))
    }
}

/// A tokenizer for tests without a model: the 256 bytes alone (id = byte, no merges), written
/// in GPT-2's byte-level alphabet, so any id sequence decodes to exactly its bytes.
#[cfg(test)]
pub(crate) fn bytes_only() -> TextTokenizer {
    use gguf_file::Value;
    let mut other = 256u32;
    let tokens = (0..=255u8)
        .map(|b| {
            let c = if byte_is_printable(b) {
                char::from(b)
            } else {
                other += 1;
                char::from_u32(other - 1).expect("a code below 512")
            };
            Value::String(c.to_string())
        })
        .collect();
    let text = |s: &str| Value::String(s.to_string());
    let metadata = [
        ("tokenizer.ggml.model", text("gpt2")),
        ("tokenizer.ggml.pre", text("gpt2")),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let ct = gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    };
    TextTokenizer::from_gguf(&ct).expect("a byte vocabulary")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        pre_tokenizer(pre).unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    #[test]
    fn llama3_splits_digits_in_threes_and_keeps_contractions() {
        // Byte-level pieces: 'Ġ' is a space.
        assert_eq!(
            pieces("llama-bpe", "I'm 1234567 ok"),
            ["I", "'m", "Ġ", "123", "456", "7", "Ġok"]
        );
        assert_eq!(pieces("llama-bpe", "x"), pieces("llama3", "x"));
    }

    #[test]
    fn smollm_splits_every_digit() {
        assert_eq!(pieces("smollm", "a 2024"), ["a", "Ġ", "2", "0", "2", "4"]);
    }

    #[test]
    fn byte_level_pieces_read_back_as_bytes() {
        assert_eq!(byte_level_bytes("Hello").unwrap(), b"Hello");
        // 'Ġ' is a space, 'Ċ' a newline.
        assert_eq!(byte_level_bytes("Ġworld").unwrap(), b" world");
        assert_eq!(byte_level_bytes("Ċ").unwrap(), b"\n");
        // "é" is the bytes C3 A9, written 'Ã' '©'; half of it alone is not UTF-8.
        assert_eq!(byte_level_bytes("Ã©").unwrap(), "é".as_bytes());
        assert_eq!(byte_level_bytes("Ã").unwrap(), [0xC3]);
        // Not the byte-level alphabet.
        assert_eq!(byte_level_bytes("▁the"), None);
        // Every byte round-trips through the alphabet.
        let alphabet: Vec<char> = (0..=255u8)
            .map(|b| {
                if byte_is_printable(b) {
                    char::from(b)
                } else {
                    let rank = (0..b).filter(|&x| !byte_is_printable(x)).count() as u32;
                    char::from_u32(256 + rank).unwrap()
                }
            })
            .collect();
        let all: String = alphabet.iter().collect();
        assert_eq!(
            byte_level_bytes(&all).unwrap(),
            (0..=255u8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused_with_a_hint() {
        let err = pre_tokenizer("mystery").err().unwrap().to_string();
        assert!(err.contains("--tokenizer"), "{err}");
    }
}
