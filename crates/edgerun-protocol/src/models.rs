//! Workers AI's model catalogue (reference §5): what `GET /client/v4/accounts/{id}/ai/models/search`
//! (and the binding's `GET /ai-api/models/search`) list, and what
//! `GET .../ai/models/schema?model=<name>` describes, for the models a node serves.
//!
//! A node serves one model under several names (its own, and the Workers AI names it stands in
//! for); each name is one catalogue entry, so that whatever a client picks from the list can be
//! run. Entries have Workers AI's shape: `id` (a UUID, derived from the name so it is stable),
//! `source` (1), `name` (the callable id), `description`, `task` (Text Generation, with
//! Cloudflare's task id), `tags`, and `properties` (`context_window` as a string, as the service
//! gives it, and `info` naming the node). The list is the v4 envelope with `result_info`
//! (`page`, `per_page`, `count`, `total_count`); pages past the end are empty, which is how the
//! official SDKs' auto-pagination knows to stop.
//!
//! The schema is the one validation enforces ([`crate::request`]): the same fields, defaults
//! and ranges, as JSON Schema, `oneOf` a prompt or messages; the output is
//! `{response, tool_calls, usage}`.

use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::query::query_param;
use crate::request::{
    DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_PENALTY, MAX_PROMPT_CHARS, MAX_SEED,
    MAX_TEMPERATURE, MAX_TOP_K, MAX_TOP_P,
};

/// Cloudflare's id of the Text Generation task.
pub const TEXT_GENERATION_TASK_ID: &str = "c329a1f9-323d-4e91-b2aa-582dd4188d34";
/// The task's name (what `?task=` filters on).
pub const TEXT_GENERATION_TASK: &str = "Text Generation";
const TEXT_GENERATION_DESCRIPTION: &str = "Family of generative text models, such as large \
     language models (LLM), that can be adapted for a variety of natural language tasks.";

/// `per_page` when the query does not say (the most a page holds: 1000).
pub const DEFAULT_PER_PAGE: usize = 100;
const MAX_PER_PAGE: usize = 1000;

/// Cloudflare's id of the Text Embeddings task.
pub const TEXT_EMBEDDINGS_TASK_ID: &str = "0137cdcf-162a-4108-94f2-1ca59e8c65ee";
/// The task's name.
pub const TEXT_EMBEDDINGS_TASK: &str = "Text Embeddings";
const TEXT_EMBEDDINGS_DESCRIPTION: &str = "Feature extraction models transform raw data into \
     numerical features that can be processed while preserving the information in the original \
     dataset. These models are ideal as part of building vector search applications or \
     Retrieval Augmented Generation workflows with Large Language Models (LLM).";

/// One served name, as the node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// The callable name.
    pub name: String,
    /// What the model is (the catalog's description, or one made from the file's name).
    pub description: String,
    /// Prompt plus output tokens allowed, once the model has loaded (text generation).
    pub context_window: Option<usize>,
    /// What the model does.
    pub task: ServedTask,
}

/// The task of a served model, with the facts the catalogue gives for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedTask {
    /// Text Generation.
    TextGeneration,
    /// Text Embeddings, with facts known once the model has loaded.
    TextEmbeddings {
        /// Length of its vectors (`output_dimensions`).
        dimensions: Option<usize>,
        /// Longest input it reads (`max_input_tokens`).
        max_input_tokens: Option<usize>,
    },
}

/// The `task` of a catalogue entry.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Task {
    /// Cloudflare's task id.
    pub id: &'static str,
    /// `Text Generation`.
    pub name: &'static str,
    /// Cloudflare's description of the task.
    pub description: &'static str,
}

/// One `{property_id, value}` of a catalogue entry.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Property {
    /// `context_window`, `info`, ...
    pub property_id: &'static str,
    /// The value, a string as the service gives it.
    pub value: String,
}

/// One catalogue entry (Workers AI's `AiModelsSearchObject`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// A UUID derived from the name ([`model_uuid`]).
    pub id: String,
    /// Always 1 (Cloudflare's own catalogue).
    pub source: u32,
    /// The callable model name.
    pub name: String,
    /// What the model is.
    pub description: String,
    /// Text Generation.
    pub task: Task,
    /// Always empty.
    pub tags: Vec<String>,
    /// `context_window` (when known) and `info`.
    pub properties: Vec<Property>,
}

impl ModelInfo {
    /// The entry for one served name.
    pub fn new(model: &ServedModel) -> Self {
        let mut properties = Vec::new();
        if let Some(window) = model.context_window {
            properties.push(Property {
                property_id: "context_window",
                value: window.to_string(),
            });
        }
        let task = match model.task {
            ServedTask::TextGeneration => Task {
                id: TEXT_GENERATION_TASK_ID,
                name: TEXT_GENERATION_TASK,
                description: TEXT_GENERATION_DESCRIPTION,
            },
            ServedTask::TextEmbeddings {
                dimensions,
                max_input_tokens,
            } => {
                for (property_id, value) in [
                    ("max_input_tokens", max_input_tokens),
                    ("output_dimensions", dimensions),
                ] {
                    if let Some(v) = value {
                        properties.push(Property {
                            property_id,
                            value: v.to_string(),
                        });
                    }
                }
                Task {
                    id: TEXT_EMBEDDINGS_TASK_ID,
                    name: TEXT_EMBEDDINGS_TASK,
                    description: TEXT_EMBEDDINGS_DESCRIPTION,
                }
            }
        };
        properties.push(Property {
            property_id: "info",
            value: "served by an edgerun node".to_string(),
        });
        Self {
            id: model_uuid(&model.name),
            source: 1,
            name: model.name.clone(),
            description: model.description.clone(),
            task,
            tags: Vec::new(),
            properties,
        }
    }

    /// The author part of a Workers AI name (`meta` of `@cf/meta/...`), if it has one.
    pub fn author(&self) -> Option<&str> {
        let rest = self.name.strip_prefix('@')?;
        rest.split('/').nth(1)
    }
}

/// A stable UUID-shaped id for a model name (the first 16 bytes of its SHA-256, marked as a
/// name-based version 5 / RFC 4122 variant UUID).
pub fn model_uuid(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The filters and page of a search (`search`, `task`, `author`, `page`, `per_page`; the
/// others the SDKs send, `hide_experimental`, `source`, `include_deprecated`, `format`, change
/// nothing here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    /// Case-insensitive substring of the name or description.
    pub search: Option<String>,
    /// The task's name (case-insensitive).
    pub task: Option<String>,
    /// The author (`meta` for `@cf/meta/...`; case-insensitive).
    pub author: Option<String>,
    /// 1-based.
    pub page: usize,
    /// 1 to 1000.
    pub per_page: usize,
}

impl SearchQuery {
    /// Reads the query string (without `?`); 400/5006 naming a bad `page` or `per_page`.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let text = |name: &str| query_param(query, name).filter(|v| !v.trim().is_empty());
        let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
            match text(name) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if (1..=max).contains(&n) => Ok(n),
                    _ => Err(ApiError::bad_input(format_args!(
                        "query parameter '{name}' must be an integer from 1 to {max}, not {v:?}"
                    ))),
                },
            }
        };
        Ok(Self {
            search: text("search"),
            task: text("task"),
            author: text("author"),
            page: number("page", 1, usize::MAX)?,
            per_page: number("per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)?,
        })
    }

    fn matches(&self, m: &ModelInfo) -> bool {
        let has = |haystack: &str, needle: &str| {
            haystack
                .to_lowercase()
                .contains(&needle.trim().to_lowercase())
        };
        self.search
            .as_deref()
            .is_none_or(|s| has(&m.name, s) || has(&m.description, s))
            && self
                .task
                .as_deref()
                .is_none_or(|t| m.task.name.eq_ignore_ascii_case(t.trim()))
            && self
                .author
                .as_deref()
                .is_none_or(|a| m.author().is_some_and(|x| x.eq_ignore_ascii_case(a.trim())))
    }
}

/// `result_info` of a list page.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ResultInfo {
    /// Entries on this page.
    pub count: usize,
    /// This page (1-based).
    pub page: usize,
    /// Page size.
    pub per_page: usize,
    /// Entries matching the filters, on all pages.
    pub total_count: usize,
}

/// The v4 list envelope: `result`, `result_info`, `success`, `errors`, `messages`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ModelList {
    /// This page's entries.
    pub result: Vec<ModelInfo>,
    /// Where this page is.
    pub result_info: ResultInfo,
    /// Always `true`.
    pub success: bool,
    /// Always empty.
    pub errors: Vec<Value>,
    /// Always empty.
    pub messages: Vec<Value>,
}

impl ModelList {
    /// The page of `models` that `query` asks for.
    pub fn search(models: &[ServedModel], query: &SearchQuery) -> Self {
        let matching: Vec<ModelInfo> = models
            .iter()
            .map(ModelInfo::new)
            .filter(|m| query.matches(m))
            .collect();
        let total_count = matching.len();
        let result: Vec<ModelInfo> = matching
            .into_iter()
            .skip((query.page - 1).saturating_mul(query.per_page))
            .take(query.per_page)
            .collect();
        Self {
            result_info: ResultInfo {
                count: result.len(),
                page: query.page,
                per_page: query.per_page,
                total_count,
            },
            result,
            success: true,
            errors: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            ApiError::internal(format_args!("failed to serialize the model list: {e}")).to_json()
        })
    }
}

/// The `model` of a schema request: 400/5006 when the query has none.
pub fn schema_model(query: Option<&str>) -> Result<String, ApiError> {
    query_param(query, "model")
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| ApiError::bad_input("required query parameter 'model' is missing"))
}

/// `{"result":{"input":..,"output":..},"success":true,"errors":[],"messages":[]}` for a
/// text-generation model: the input schema validation enforces, the output the node answers.
pub fn schema_envelope() -> String {
    crate::SuccessEnvelope::new(json!({
        "input": input_schema(),
        "output": output_schema(),
    }))
    .to_json()
}

fn sampling_properties() -> Value {
    let number = |description: &str, min: f64, max: f64| json!({"type": "number", "minimum": min, "maximum": max, "description": description});
    json!({
        "stream": {"type": "boolean", "default": false,
                   "description": "If true, the response will be streamed back incrementally using SSE, Server Sent Events."},
        "max_tokens": {"type": "integer", "default": DEFAULT_MAX_TOKENS, "minimum": 1,
                       "description": "The maximum number of tokens to generate in the response."},
        "temperature": {"type": "number", "default": DEFAULT_TEMPERATURE, "minimum": 0, "maximum": MAX_TEMPERATURE,
                        "description": "Controls the randomness of the output; higher values produce more random results."},
        "top_p": number("Adjusts the creativity of the AI's responses by controlling how many possible words it considers.", 0.0, MAX_TOP_P),
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                  "description": "Limits the AI to choose from the top 'k' most probable words."},
        "seed": {"type": "integer", "minimum": 1, "maximum": MAX_SEED,
                 "description": "Random seed for reproducibility of the generation."},
        "repetition_penalty": number("Penalty for repeated tokens; higher values discourage repetition.", 0.0, MAX_PENALTY),
        "frequency_penalty": number("Decreases the likelihood of the model repeating the same lines verbatim.", 0.0, MAX_PENALTY),
        "presence_penalty": number("Increases the likelihood of the model introducing new topics.", 0.0, MAX_PENALTY),
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"type": "string", "enum": ["json_object", "json_schema"]},
            "json_schema": {"type": "object", "description": "A bare JSON Schema (with type json_schema); the answer always validates against it. Not with stream."}
        }},
    })
}

/// `{"result":{"input":..,"output":..},..}` for a text-embeddings model
/// ([`crate::embeddings`]).
pub fn embedding_schema_envelope() -> String {
    use crate::embeddings::{MAX_EMBED_TEXT_CHARS, MAX_RUN_TEXTS};
    let text = json!({"type": "string", "minLength": 1, "maxLength": MAX_EMBED_TEXT_CHARS});
    crate::SuccessEnvelope::new(json!({
        "input": {
            "type": "object",
            "additionalProperties": true,
            "properties": {
                "text": {"oneOf": [text, {"type": "array", "items": text, "maxItems": MAX_RUN_TEXTS}],
                         "description": "The text to embed, or a list of texts"},
                "pooling": {"type": "string", "enum": ["mean", "cls"], "default": "mean",
                            "description": "How token vectors become one: mean (the default, Workers AI's) or cls"},
                "truncate_inputs": {"type": "boolean", "default": false,
                                    "description": "Cut texts longer than the model reads instead of refusing them"}
            },
            "required": ["text"]
        },
        "output": {
            "type": "object",
            "contentType": "application/json",
            "properties": {
                "shape": {"type": "array", "items": {"type": "number"}},
                "data": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "pooling": {"type": "string", "enum": ["mean", "cls"]}
            }
        }
    }))
    .to_json()
}

/// The input schema: `oneOf` a prompt or messages, with the sampling fields of both.
pub fn input_schema() -> Value {
    let mut prompt = sampling_properties();
    let mut messages = sampling_properties();
    prompt["prompt"] = json!({"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS,
                              "description": "The input text prompt for the model to generate a response."});
    prompt["raw"] = json!({"type": "boolean", "default": false,
                           "description": "If true, a chat template is not applied and you must adhere to the specific model's expected formatting."});
    messages["messages"] = json!({
        "type": "array",
        "description": "An array of message objects representing the conversation history.",
        "items": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "description": "The role of the message sender (e.g., 'user', 'assistant', 'system', 'tool')."},
            "content": {"oneOf": [
                {"type": "string", "maxLength": MAX_PROMPT_CHARS},
                {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "text": {"type": "string"}}}}
            ]}
        }}
    });
    messages["tools"] = json!({"type": "array", "items": {"type": "object"},
                               "description": "A list of tools available for the assistant to use."});
    messages["functions"] = json!({"type": "array", "items": {"type": "object"}});
    json!({
        "type": "object",
        "description": "A prompt (`raw` for no chat template) or a conversation, and the sampling fields",
        // Unknown fields are ignored, not refused (crate::request's leniency).
        "additionalProperties": true,
        "oneOf": [
            {"title": "Prompt", "properties": prompt, "required": ["prompt"]},
            {"title": "Messages", "properties": messages, "required": ["messages"]},
        ]
    })
}

/// The output schema: `response`, `usage`, `tool_calls`.
pub fn output_schema() -> Value {
    json!({
        "type": "object",
        "description": "The generated text, the tool calls made, and the tokens used",
        "additionalProperties": false,
        "contentType": "application/json",
        "properties": {
            "response": {"type": ["string", "object", "array", "number", "boolean", "null"],
                         "description": "The generated text response from the model; in JSON mode (response_format) the JSON value itself"},
            "usage": {"type": "object", "description": "Usage statistics for the inference request", "properties": {
                "prompt_tokens": {"type": "number", "default": 0, "description": "Total number of tokens in input"},
                "completion_tokens": {"type": "number", "default": 0, "description": "Total number of tokens in output"},
                "total_tokens": {"type": "number", "default": 0, "description": "Total number of input and output tokens"}
            }},
            "tool_calls": {"type": "array", "description": "An array of tool calls requests made during the response generation",
                "items": {"type": "object", "properties": {
                    "arguments": {"type": "object", "description": "The arguments passed to be passed to the tool call request"},
                    "name": {"type": "string", "description": "The name of the tool to be called"}
                }}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(names: &[&str]) -> Vec<ServedModel> {
        names
            .iter()
            .map(|n| ServedModel {
                name: n.to_string(),
                description: format!("{n} model"),
                context_window: Some(7968),
                task: ServedTask::TextGeneration,
            })
            .collect()
    }

    #[test]
    fn entries_have_workers_ais_shape() {
        let m = ModelInfo::new(&served(&["@cf/meta/llama-3-8b-instruct"])[0]);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["name"], "@cf/meta/llama-3-8b-instruct");
        assert_eq!(v["source"], 1);
        assert_eq!(v["task"]["name"], "Text Generation");
        assert_eq!(v["task"]["id"], TEXT_GENERATION_TASK_ID);
        assert_eq!(
            v["properties"][0],
            json!({"property_id": "context_window", "value": "7968"})
        );
        assert_eq!(m.author(), Some("meta"));
        // Stable, UUID-shaped, different per name.
        assert_eq!(m.id, model_uuid("@cf/meta/llama-3-8b-instruct"));
        assert_eq!(m.id.len(), 36);
        assert_eq!(&m.id[14..15], "5");
        assert_ne!(m.id, model_uuid("other"));
        let unknown_window = ServedModel {
            context_window: None,
            ..served(&["x"])[0].clone()
        };
        assert_eq!(ModelInfo::new(&unknown_window).properties.len(), 1);
        assert_eq!(ModelInfo::new(&unknown_window).author(), None);
    }

    #[test]
    fn embedding_models_are_text_embeddings_with_their_dimensions() {
        let m = ModelInfo::new(&ServedModel {
            name: "@cf/baai/bge-small-en-v1.5".into(),
            description: "bge".into(),
            context_window: None,
            task: ServedTask::TextEmbeddings {
                dimensions: Some(384),
                max_input_tokens: Some(512),
            },
        });
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["task"]["name"], "Text Embeddings");
        assert_eq!(v["task"]["id"], TEXT_EMBEDDINGS_TASK_ID);
        assert_eq!(
            v["properties"],
            json!([{"property_id": "max_input_tokens", "value": "512"},
                   {"property_id": "output_dimensions", "value": "384"},
                   {"property_id": "info", "value": "served by an edgerun node"}])
        );
        let q = SearchQuery::parse(Some("task=text+embeddings")).unwrap();
        assert_eq!(ModelList::search(&[m_served()], &q).result.len(), 0);
        let s: Value = serde_json::from_str(&embedding_schema_envelope()).unwrap();
        assert_eq!(s["result"]["input"]["required"], json!(["text"]));
    }

    fn m_served() -> ServedModel {
        served(&["chat"])[0].clone()
    }

    #[test]
    fn search_filters_and_pages() {
        let models = served(&[
            "@cf/meta/llama-3-8b-instruct",
            "SmolLM2-135M",
            "@hf/other/m",
        ]);
        let q = |s: &str| SearchQuery::parse(Some(s)).unwrap();
        let names = |l: ModelList| l.result.into_iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(ModelList::search(&models, &q("")).result.len(), 3);
        assert_eq!(
            names(ModelList::search(&models, &q("search=smol"))),
            ["SmolLM2-135M"]
        );
        assert_eq!(
            names(ModelList::search(&models, &q("author=Meta"))),
            ["@cf/meta/llama-3-8b-instruct"]
        );
        assert_eq!(
            ModelList::search(&models, &q("task=Text+Generation"))
                .result
                .len(),
            3
        );
        assert!(ModelList::search(&models, &q("task=Translation"))
            .result
            .is_empty());
        let page = ModelList::search(&models, &q("per_page=2&page=2"));
        assert_eq!(names(page.clone()), ["@hf/other/m"]);
        assert_eq!(
            page.result_info,
            ResultInfo {
                count: 1,
                page: 2,
                per_page: 2,
                total_count: 3
            }
        );
        // Past the end: empty (the SDKs stop there).
        assert!(ModelList::search(&models, &q("page=3&per_page=2"))
            .result
            .is_empty());
        for bad in ["page=0", "per_page=0", "per_page=1001", "page=x"] {
            let e = SearchQuery::parse(Some(bad)).unwrap_err();
            assert_eq!((e.status, e.code), (400, 5006), "{bad}");
        }
        let v: Value = serde_json::from_str(&ModelList::search(&models, &q("")).to_json()).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["result_info"]["total_count"], 3);
    }

    #[test]
    fn the_schema_is_what_validation_enforces() {
        assert_eq!(
            schema_model(Some("model=%40cf%2Fmeta%2Fx")).unwrap(),
            "@cf/meta/x"
        );
        assert_eq!(schema_model(None).unwrap_err().code, 5006);
        let v: Value = serde_json::from_str(&schema_envelope()).unwrap();
        let input = &v["result"]["input"];
        assert_eq!(input["oneOf"][0]["required"], json!(["prompt"]));
        assert_eq!(input["oneOf"][1]["required"], json!(["messages"]));
        let p = &input["oneOf"][0]["properties"];
        assert_eq!(p["max_tokens"]["default"], DEFAULT_MAX_TOKENS);
        assert_eq!(p["temperature"]["maximum"], MAX_TEMPERATURE);
        assert_eq!(p["top_k"]["maximum"], 50);
        assert_eq!(p["prompt"]["maxLength"], MAX_PROMPT_CHARS);
        assert!(v["result"]["output"]["properties"]["usage"].is_object());
    }
}
