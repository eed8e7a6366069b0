//! Text embeddings on the wire, in both dialects.
//!
//! * Workers AI (`/ai/run/@cf/baai/bge-*`, the binding): `{"text": "…" | ["…", …],
//!   "pooling"?: "mean" | "cls", "truncate_inputs"?: bool}`, as the published input schema of
//!   the bge models has it (every string at least one character, at most
//!   [`MAX_RUN_TEXTS`] of them), answered with `{"shape": [n, dim], "data": [[…], …],
//!   "pooling": "mean"}` in the success envelope (bare for the binding). `pooling` defaults to
//!   `mean`, Workers AI's documented default (kept for compatibility with vectors already
//!   stored); a text longer than the model reads is refused (400 / 5006) unless
//!   `truncate_inputs` is true.
//! * OpenAI (`/v1/embeddings`, `/ai/v1/embeddings`): `{"model", "input": "…" | ["…"] | [ids]
//!   | [[ids]], "encoding_format"?: "float" | "base64", "dimensions"?, "user"?}`, answered with
//!   `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model",
//!   "usage": {"prompt_tokens", "total_tokens"}}`. `base64` is the little-endian f32 bytes of
//!   each vector, as OpenAI's SDKs decode them. `dimensions` other than the model's own is
//!   refused (no model served here is trained for shortened vectors). Over-long inputs are
//!   refused unless `truncate_inputs` (this node's extension, the Workers AI name) is true.
//!
//! Unknown fields are accepted and ignored, as for text generation; `null` counts as absent.

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::fields::{non_null, openai as oa, workers_ai as wa};

/// Most texts in one Workers AI request (the bge schemas' `maxItems`).
pub const MAX_RUN_TEXTS: usize = 100;
/// Most inputs in one OpenAI request (OpenAI's own limit).
pub const MAX_OPENAI_INPUTS: usize = 2048;
/// Longest text, in characters (a text this long is far beyond any encoder's window; the cap
/// bounds tokenizing work before the length check).
pub const MAX_EMBED_TEXT_CHARS: usize = 131_072;

/// How token vectors become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingChoice {
    /// `mean`: the mean of the input's token vectors.
    Mean,
    /// `cls`: the first (`[CLS]`) token's vector.
    Cls,
}

impl PoolingChoice {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingChoice::Mean => "mean",
            PoolingChoice::Cls => "cls",
        }
    }
}

/// One input to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingInput {
    /// A text, tokenized by the model's tokenizer (with its special tokens).
    Text(String),
    /// Token ids, used as they are (OpenAI's token-array inputs).
    Tokens(Vec<u32>),
}

/// A validated Workers AI embedding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingRun {
    /// One or more texts (a single string is a list of one).
    pub texts: Vec<String>,
    /// `mean` unless the request says.
    pub pooling: PoolingChoice,
    /// Cut over-long texts to the model's window instead of refusing them.
    pub truncate: bool,
}

fn body_object(
    body: &[u8],
    wording: fn(String) -> ApiError,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(wording("the request body must be a JSON object".into())),
        Err(e) => Err(wording(format!("body is not valid JSON: {e}"))),
    }
}

impl EmbeddingRun {
    /// Validates a run body (Workers AI's wording: 400 / 5006 naming the field's pointer).
    pub fn from_json_bytes(body: &[u8]) -> Result<Self, ApiError> {
        let map = body_object(body, ApiError::bad_input)?;
        Self::from_map(&map)
    }

    /// Validates an already parsed body (the binding's `inputs`).
    pub fn from_value(value: &Value) -> Result<Self, ApiError> {
        match value {
            Value::Object(map) => Self::from_map(map),
            other => Err(wa::type_mismatch("/", other, "object")),
        }
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self, ApiError> {
        let texts = match non_null(map, "text") {
            None => return Err(ApiError::bad_input("required properties at '/' are 'text'")),
            Some(Value::String(s)) => {
                check_text(s, "/text")?;
                vec![s.clone()]
            }
            Some(Value::Array(items)) => {
                if items.is_empty() {
                    return Err(ApiError::bad_input("'/text' must have at least 1 item"));
                }
                if items.len() > MAX_RUN_TEXTS {
                    return Err(ApiError::bad_input(format_args!(
                        "'/text' must have at most {MAX_RUN_TEXTS} items, got {}",
                        items.len()
                    )));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Value::String(s) => {
                            check_text(s, &format!("/text/{i}"))?;
                            Ok(s.clone())
                        }
                        other => Err(wa::type_mismatch(&format!("/text/{i}"), other, "string")),
                    })
                    .collect::<Result<_, _>>()?
            }
            Some(other) => return Err(wa::type_mismatch("/text", other, "string,array")),
        };
        let pooling = match non_null(map, "pooling") {
            None => PoolingChoice::Mean,
            Some(Value::String(s)) if s == "mean" => PoolingChoice::Mean,
            Some(Value::String(s)) if s == "cls" => PoolingChoice::Cls,
            Some(Value::String(s)) => {
                return Err(ApiError::bad_input(format_args!(
                    "'/pooling' must be one of 'mean', 'cls', got '{s}'"
                )))
            }
            Some(other) => return Err(wa::type_mismatch("/pooling", other, "string")),
        };
        let truncate = wa::boolean(map, "truncate_inputs", "/truncate_inputs")?.unwrap_or(false);
        Ok(Self {
            texts,
            pooling,
            truncate,
        })
    }
}

fn check_text(s: &str, pointer: &str) -> Result<(), ApiError> {
    if s.is_empty() {
        return Err(ApiError::bad_input(format_args!(
            "'{pointer}' must NOT have fewer than 1 characters"
        )));
    }
    if s.chars().count() > MAX_EMBED_TEXT_CHARS {
        return Err(ApiError::bad_input(format_args!(
            "'{pointer}' must NOT have more than {MAX_EMBED_TEXT_CHARS} characters"
        )));
    }
    Ok(())
}

/// Workers AI's embedding answer (the `result` of the envelope, or the binding's bare body).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingRunOutput {
    /// `[inputs, dimensions]`.
    pub shape: [usize; 2],
    /// One vector per text, in order.
    pub data: Vec<Vec<f32>>,
    /// `mean` or `cls`.
    pub pooling: &'static str,
}

impl EmbeddingRunOutput {
    /// The output for `data` (each of `dimensions` numbers).
    pub fn new(data: Vec<Vec<f32>>, dimensions: usize, pooling: PoolingChoice) -> Self {
        Self {
            shape: [data.len(), dimensions],
            data,
            pooling: pooling.as_str(),
        }
    }
}

/// How OpenAI's answer carries each vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON numbers.
    Float,
    /// Base64 of the vector's little-endian f32 bytes.
    Base64,
}

/// A validated OpenAI embeddings request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiEmbeddingRequest {
    /// The model asked for.
    pub model: String,
    /// One or more inputs.
    pub inputs: Vec<EmbeddingInput>,
    /// `encoding_format`.
    pub encoding: EncodingFormat,
    /// What `dimensions` asked for, if anything (the node refuses any but the model's own).
    pub dimensions: Option<usize>,
    /// Cut over-long inputs instead of refusing them (`truncate_inputs`).
    pub truncate: bool,
}

impl OpenAiEmbeddingRequest {
    /// Validates a `/v1/embeddings` body (OpenAI's wording: 400 `invalid_request_error`).
    pub fn from_json_bytes(body: &[u8]) -> Result<Self, ApiError> {
        let map = body_object(body, ApiError::invalid_request)?;
        let model = match non_null(&map, "model") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None => {
                return Err(ApiError::invalid_request(
                    "you must provide a model parameter",
                ))
            }
            Some(other) => return Err(oa::type_error("model", other, "a string")),
        };
        let inputs = match non_null(&map, "input") {
            None => return Err(ApiError::invalid_request("'input' is a required property")),
            Some(value) => parse_input(value)?,
        };
        let encoding = match non_null(&map, "encoding_format") {
            None => EncodingFormat::Float,
            Some(Value::String(s)) if s == "float" => EncodingFormat::Float,
            Some(Value::String(s)) if s == "base64" => EncodingFormat::Base64,
            Some(Value::String(s)) => {
                return Err(ApiError::invalid_request(format_args!(
                    "'encoding_format' must be 'float' or 'base64', got '{s}'"
                )))
            }
            Some(other) => return Err(oa::type_error("encoding_format", other, "a string")),
        };
        let dimensions =
            oa::integer(&map, "dimensions", 1, i128::from(u32::MAX))?.map(|d| d as usize);
        if let Some(user) = non_null(&map, "user") {
            if !user.is_string() {
                return Err(oa::type_error("user", user, "a string"));
            }
        }
        let truncate = oa::boolean(&map, "truncate_inputs")?.unwrap_or(false);
        Ok(Self {
            model,
            inputs,
            encoding,
            dimensions,
            truncate,
        })
    }
}

fn parse_input(value: &Value) -> Result<Vec<EmbeddingInput>, ApiError> {
    let text = |s: &str, name: &str| -> Result<EmbeddingInput, ApiError> {
        if s.is_empty() {
            return Err(ApiError::invalid_request(format_args!(
                "'{name}' must not be an empty string"
            )));
        }
        if s.chars().count() > MAX_EMBED_TEXT_CHARS {
            return Err(ApiError::invalid_request(format_args!(
                "'{name}' is longer than {MAX_EMBED_TEXT_CHARS} characters"
            )));
        }
        Ok(EmbeddingInput::Text(s.to_string()))
    };
    let ids = |items: &[Value], name: &str| -> Result<EmbeddingInput, ApiError> {
        if items.is_empty() {
            return Err(ApiError::invalid_request(format_args!(
                "'{name}' must not be an empty array"
            )));
        }
        items
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if id <= u64::from(u32::MAX) => Ok(id as u32),
                _ => Err(ApiError::invalid_request(format_args!(
                    "'{name}' must hold token ids (whole numbers from 0), got {v}"
                ))),
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(EmbeddingInput::Tokens)
    };
    match value {
        Value::String(s) => Ok(vec![text(s, "input")?]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid_request(
            "'input' must not be an empty array",
        )),
        Value::Array(items) if items.len() > MAX_OPENAI_INPUTS => {
            Err(ApiError::invalid_request(format_args!(
                "'input' must have at most {MAX_OPENAI_INPUTS} items, got {}",
                items.len()
            )))
        }
        // One input as token ids.
        Value::Array(items) if items[0].is_number() => Ok(vec![ids(items, "input")?]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let name = format!("input[{i}]");
                match item {
                    Value::String(s) => text(s, &name),
                    Value::Array(inner) => ids(inner, &name),
                    other => Err(oa::type_error(
                        &name,
                        other,
                        "a string or an array of token ids",
                    )),
                }
            })
            .collect(),
        other => Err(oa::type_error(
            "input",
            other,
            "a string, an array of strings or an array of token ids",
        )),
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    /// f32s as JSON numbers, each in its shortest exact form.
    Float(&'a [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct OpenAiEmbedding<'a> {
    object: &'static str,
    index: usize,
    embedding: Vector<'a>,
}

#[derive(Serialize)]
struct OpenAiEmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct OpenAiEmbeddingList<'a> {
    object: &'static str,
    data: Vec<OpenAiEmbedding<'a>>,
    model: &'a str,
    usage: OpenAiEmbeddingUsage,
}

/// OpenAI's answer: one `embedding` object per input, in order.
pub fn openai_embedding_response(
    model: &str,
    vectors: &[Vec<f32>],
    encoding: EncodingFormat,
    prompt_tokens: usize,
) -> String {
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: match encoding {
                EncodingFormat::Float => Vector::Float(v),
                EncodingFormat::Base64 => Vector::Base64(base64_f32(v)),
            },
        })
        .collect();
    let list = OpenAiEmbeddingList {
        object: "list",
        data,
        model,
        usage: OpenAiEmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    serde_json::to_string(&list).unwrap_or_else(|e| {
        crate::openai::error_body(&ApiError::internal(format_args!(
            "failed to serialize response: {e}"
        )))
    })
}

/// Base64 (standard alphabet, padded) of the vector's little-endian f32 bytes.
pub fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &str) -> Result<EmbeddingRun, ApiError> {
        EmbeddingRun::from_json_bytes(body.as_bytes())
    }

    fn oai(body: &str) -> Result<OpenAiEmbeddingRequest, ApiError> {
        OpenAiEmbeddingRequest::from_json_bytes(body.as_bytes())
    }

    #[test]
    fn workers_ai_text_is_a_string_or_a_list() {
        let one = run(r#"{"text":"hello"}"#).unwrap();
        assert_eq!(one.texts, vec!["hello"]);
        assert_eq!(one.pooling, PoolingChoice::Mean);
        assert!(!one.truncate);
        let many = run(r#"{"text":["a","b"],"pooling":"cls","truncate_inputs":true}"#).unwrap();
        assert_eq!(many.texts, vec!["a", "b"]);
        assert_eq!(many.pooling, PoolingChoice::Cls);
        assert!(many.truncate);
    }

    #[test]
    fn workers_ai_refusals_name_the_field() {
        let cases = [
            (r#"{}"#, "'text'"),
            (r#"{"text":""}"#, "'/text' must NOT have fewer than 1"),
            (r#"{"text":[]}"#, "at least 1 item"),
            (r#"{"text":["a",""]}"#, "'/text/1'"),
            (r#"{"text":["a",3]}"#, "Type mismatch of '/text/1'"),
            (r#"{"text":7}"#, "Type mismatch of '/text'"),
            (
                r#"{"text":"a","pooling":"max"}"#,
                "'/pooling' must be one of",
            ),
            (r#"{"text":"a","truncate_inputs":3}"#, "'/truncate_inputs'"),
            ("[1]", "object"),
            ("{", "not valid JSON"),
        ];
        for (body, needle) in cases {
            let e = run(body).unwrap_err();
            assert_eq!((e.status, e.code), (400, 5006), "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let many = format!(r#"{{"text":[{}]}}"#, vec![r#""x""#; 101].join(","));
        assert!(run(&many)
            .unwrap_err()
            .message
            .contains("at most 100 items"));
    }

    #[test]
    fn openai_input_takes_every_documented_form() {
        let r = oai(r#"{"model":"m","input":"hi"}"#).unwrap();
        assert_eq!(r.inputs, vec![EmbeddingInput::Text("hi".into())]);
        assert_eq!(r.encoding, EncodingFormat::Float);
        let r = oai(r#"{"model":"m","input":["a","b"],"encoding_format":"base64"}"#).unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.encoding, EncodingFormat::Base64);
        let r = oai(r#"{"model":"m","input":[101,2023,102]}"#).unwrap();
        assert_eq!(r.inputs, vec![EmbeddingInput::Tokens(vec![101, 2023, 102])]);
        let r = oai(r#"{"model":"m","input":[[101,102],[101,7,102]],"dimensions":384}"#).unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.dimensions, Some(384));
    }

    #[test]
    fn openai_refusals() {
        let cases = [
            (r#"{"input":"a"}"#, "model"),
            (r#"{"model":"m"}"#, "'input'"),
            (r#"{"model":"m","input":""}"#, "empty string"),
            (r#"{"model":"m","input":[]}"#, "empty array"),
            (
                r#"{"model":"m","input":[[]]}"#,
                "'input[0]' must not be an empty array",
            ),
            (r#"{"model":"m","input":[-1]}"#, "token ids"),
            (r#"{"model":"m","input":[{"a":1}]}"#, "'input[0]'"),
            (
                r#"{"model":"m","input":"a","encoding_format":"hex"}"#,
                "encoding_format",
            ),
            (r#"{"model":"m","input":"a","dimensions":0}"#, "dimensions"),
        ];
        for (body, needle) in cases {
            let e = oai(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        let body = openai_embedding_response("m", &[vec![1.0, -2.0]], EncodingFormat::Base64, 3);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["data"][0]["index"], 0);
        assert_eq!(v["data"][0]["embedding"], base64_f32(&[1.0, -2.0]));
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 3);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn workers_ai_output_shape() {
        let out = EmbeddingRunOutput::new(vec![vec![0.5; 4], vec![0.25; 4]], 4, PoolingChoice::Cls);
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["shape"], serde_json::json!([2, 4]));
        assert_eq!(v["pooling"], "cls");
        assert_eq!(v["data"][1][0], 0.25);
    }
}
