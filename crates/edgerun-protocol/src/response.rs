//! Non-streaming responses: the model output object, token usage and the
//! Cloudflare v4 success envelope (reference §2.1).
//!
//! REST answers are `{"result":<output>,"success":true,"errors":[],
//! "messages":[]}`; binding-style answers are the bare output. Either way the
//! `Content-Type` must be exactly [`JSON_CONTENT_TYPE`] (no `charset`): the
//! Workers binding only parses bodies whose type is exactly that string and
//! hands anything else back as a raw byte stream (reference §3.4).

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorItem};

/// The `Content-Type` of every JSON answer, exactly (no parameters).
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Token accounting of one generation.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// `prompt_tokens + completion_tokens` (saturating).
    pub total_tokens: u32,
    /// How many of `prompt_tokens` were served from the prefix cache, where Workers AI and
    /// OpenAI both report it (`usage.prompt_tokens_details.cached_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// The breakdown of a usage's prompt tokens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values were reused, not computed.
    pub cached_tokens: u32,
}

impl Usage {
    /// Usage with `total_tokens` computed.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    /// The same usage, saying that `cached_tokens` of the prompt came from the prefix cache.
    pub fn with_cached_tokens(self, cached_tokens: u32) -> Self {
        Self {
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
            ..self
        }
    }
}

/// The model output of a text-generation run, in Cloudflare's key order:
/// `response`, `tool_calls` (always present, empty when none), `usage`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TextGenerationOutput {
    /// The generated text; in JSON mode the JSON value it is (Workers AI answers an object
    /// there, not a string).
    pub response: serde_json::Value,
    /// Tool calls the model made (legacy `{name, arguments}` objects).
    pub tool_calls: Vec<serde_json::Value>,
    /// Token accounting.
    pub usage: Usage,
}

/// Cloudflare v4 success envelope: `result`, `success` (true), `errors` and
/// `messages` (both empty), in that key order.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SuccessEnvelope<T> {
    /// The payload.
    pub result: T,
    /// Always `true`.
    pub success: bool,
    /// Always empty.
    pub errors: Vec<ErrorItem>,
    /// Always empty.
    pub messages: Vec<serde_json::Value>,
}

impl<T: Serialize> SuccessEnvelope<T> {
    /// Wrap `result`.
    pub fn new(result: T) -> Self {
        Self {
            result,
            success: true,
            errors: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Serialise to compact JSON. Should `T`'s `Serialize` fail (it cannot for
    /// this crate's types), the JSON of an internal-error envelope is returned
    /// instead of panicking.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            ApiError::internal(format_args!("failed to serialize response: {e}")).to_json()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn success_envelope_is_byte_exact() {
        let out = TextGenerationOutput {
            response: "hi".into(),
            tool_calls: vec![],
            usage: Usage::new(1, 2),
        };
        assert_eq!(
            SuccessEnvelope::new(out).to_json(),
            r#"{"result":{"response":"hi","tool_calls":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}},"success":true,"errors":[],"messages":[]}"#
        );
    }

    #[test]
    fn bare_output_with_tool_calls() {
        let out = TextGenerationOutput {
            response: "".into(),
            tool_calls: vec![json!({"arguments": {"city": "Paris"}, "name": "getWeather"})],
            usage: Usage::new(10, 5),
        };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"response":"","tool_calls":[{"arguments":{"city":"Paris"},"name":"getWeather"}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#
        );
    }

    #[test]
    fn json_mode_response_is_a_value() {
        let out = TextGenerationOutput {
            response: json!({"hello": "world"}),
            tool_calls: vec![],
            usage: Usage::new(1, 2),
        };
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"response":{"hello":"world"},"tool_calls":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#
        );
    }

    #[test]
    fn usage_total_saturates() {
        assert_eq!(Usage::new(3, 4).total_tokens, 7);
        assert_eq!(Usage::new(u32::MAX, 4).total_tokens, u32::MAX);
        assert_eq!(Usage::default(), Usage::new(0, 0));
    }

    #[test]
    fn envelope_round_trips() {
        let env = SuccessEnvelope::new(TextGenerationOutput {
            response: "é🦀\"\n".into(),
            tool_calls: vec![],
            usage: Usage::new(1, 1),
        });
        let back: SuccessEnvelope<TextGenerationOutput> =
            serde_json::from_str(&env.to_json()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn failing_serialize_gives_internal_error_json() {
        use std::collections::HashMap;
        // Non-string map keys cannot be serialised to JSON.
        let mut bad = HashMap::new();
        bad.insert(vec![1u8], 1);
        let json = SuccessEnvelope::new(bad).to_json();
        assert!(json.starts_with(r#"{"errors":[{"code":3000,"message":"AiError: Internal error: failed to serialize response"#));
    }

    #[test]
    fn content_type_is_exact() {
        assert_eq!(JSON_CONTENT_TYPE, "application/json");
    }
}
