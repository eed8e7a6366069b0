//! The one error type of the crate, [`ApiError`], and the Cloudflare v4 error
//! envelope it serialises to.
//!
//! Every failure a client can see — bad input, auth, capacity, routing, engine
//! trouble — is an `ApiError`: an HTTP status, a Cloudflare internal code and a
//! message. The codes and texts follow the Workers AI error table (reference
//! §2.3); where Cloudflare publishes no text, the wording is ours and kept close
//! to theirs.
//!
//! The JSON shape is `{"errors":[{"code":..,"message":..}],"success":false,
//! "result":..,"messages":[]}`. `result` is `{}` for bad-input errors (code
//! 5006, as observed from the real service) and `null` for everything else.

use std::fmt::Display;

use serde::{Deserialize, Serialize};

/// Code Cloudflare uses for schema violations ("AiError: Bad input: ...").
pub const CODE_BAD_INPUT: u32 = 5006;
/// Code Cloudflare uses for a model it does not serve.
pub const CODE_NO_SUCH_MODEL: u32 = 5007;

/// A client-visible failure: HTTP status, Cloudflare internal code, message.
///
/// `Display` prints the message only. Build one with the constructors below so
/// that status, code and wording stay consistent between the node and the
/// Worker.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code of the response.
    pub status: u16,
    /// Cloudflare internal error code (the `code` of the envelope's error item).
    pub code: u32,
    /// Human-readable message (the `message` of the envelope's error item).
    pub message: String,
}

impl ApiError {
    /// The `Retry-After` value (seconds) a response with this error carries: `"1"` for 429
    /// (busy) and 503 (loading, draining, no node), none otherwise. The node and the Worker both
    /// set the header from this.
    pub fn retry_after(&self) -> Option<&'static str> {
        matches!(self.status, 429 | 503).then_some("1")
    }

    /// Any constructor's common path.
    pub fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 / 5006: the request body violates the model's input schema.
    /// Message: `AiError: Bad input: {detail}`.
    pub fn bad_input(detail: impl Display) -> Self {
        Self::new(400, CODE_BAD_INPUT, format!("AiError: Bad input: {detail}"))
    }

    /// 400 / 5007: the model in the URL is not served here.
    pub fn no_such_model(model: &str) -> Self {
        Self::new(
            400,
            CODE_NO_SUCH_MODEL,
            format!("No such model {model} or task"),
        )
    }

    /// 400 / 5006 in the OpenAI dialect's words: `detail` is the whole message (no
    /// `AiError: Bad input:` prefix).
    pub fn invalid_request(detail: impl Display) -> Self {
        Self::new(400, CODE_BAD_INPUT, detail.to_string())
    }

    /// 404 / 5007: the model named in an OpenAI `/v1` request body is not served here (OpenAI's
    /// status and wording for `model_not_found`).
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            CODE_NO_SUCH_MODEL,
            format!("The model `{model}` does not exist"),
        )
    }

    /// 401 / 10000: missing or wrong credentials (Cloudflare's exact text).
    pub fn authentication() -> Self {
        Self::new(401, 10000, "Authentication error")
    }

    /// 403 / 10000: credentials were understood but are not allowed here
    /// (Cloudflare returns code 10000 with 403 on other v4 endpoints).
    pub fn forbidden(detail: impl Display) -> Self {
        Self::new(403, 10000, format!("Authentication error: {detail}"))
    }

    /// 413 / 3006: the request body exceeds `limit_bytes`.
    pub fn request_too_large(limit_bytes: usize) -> Self {
        Self::new(
            413,
            3006,
            format!("Request is too large: body exceeds {limit_bytes} bytes"),
        )
    }

    /// 400 / 5006: prompt tokens plus `max_tokens` do not fit the context window.
    pub fn context_window_exceeded(
        prompt_tokens: usize,
        max_tokens: usize,
        context_window: usize,
    ) -> Self {
        Self::bad_input(format_args!(
            "prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}; together they \
             exceed the model's context window of {context_window} tokens"
        ))
    }

    /// 429 / 3040: the node is busy (the `rejectIfBusy` text of Cloudflare).
    pub fn capacity() -> Self {
        Self::new(
            429,
            3040,
            "Capacity temporarily exceeded, please try again.",
        )
    }

    /// 400 / 7000: no route matches the request path (Cloudflare's exact text).
    pub fn no_route() -> Self {
        Self::new(400, 7000, "No route for that URI")
    }

    /// 405 / 7001: the path exists but not for this method. Cloudflare names
    /// the method (`GET not supported for requested URI.`); see
    /// [`ApiError::method_not_supported`] for that form.
    pub fn method_not_allowed() -> Self {
        Self::new(405, 7001, "Method not supported for requested URI.")
    }

    /// 405 / 7001 with the method named, exactly like Cloudflare:
    /// `{method} not supported for requested URI.`
    pub fn method_not_supported(method: &str) -> Self {
        Self::new(
            405,
            7001,
            format!("{method} not supported for requested URI."),
        )
    }

    /// 500 / 3000: an unexpected failure inside the node.
    pub fn internal(detail: impl Display) -> Self {
        Self::new(500, 3000, format!("AiError: Internal error: {detail}"))
    }

    /// 503 / 3040: the node cannot serve right now (model not loaded,
    /// shutting down, ...). The message is `detail` verbatim.
    pub fn unavailable(detail: impl Display) -> Self {
        Self::new(503, 3040, detail.to_string())
    }

    /// 408 / 3007: the request took too long.
    pub fn timeout() -> Self {
        Self::new(408, 3007, "Request timeout")
    }

    /// 405 / 5005: a `lora` was requested. Cloudflare's text names the model
    /// (`The model {model} does not support LoRa inference`); validation does
    /// not know the model, so the text here is generic.
    pub fn lora_unsupported() -> Self {
        Self::new(405, 5005, "This model does not support LoRa inference")
    }

    /// 400 / 5023: a `json_schema` `response_format` together with `stream: true`.
    pub fn json_mode_with_stream() -> Self {
        Self::new(
            400,
            5023,
            "AiError: JSON Schema mode is not supported with stream mode",
        )
    }

    /// 400 / 5006: JSON mode's answer is not a complete JSON value (it reached `max_tokens`
    /// first). Workers AI's text starts the same way.
    pub fn json_mode_not_met(detail: impl Display) -> Self {
        Self::bad_input(format_args!("JSON Mode couldn't be met: {detail}"))
    }

    /// The `{code, message}` item of this error.
    pub fn item(&self) -> ErrorItem {
        ErrorItem {
            code: self.code,
            message: self.message.clone(),
        }
    }

    /// The full Cloudflare v4 error envelope of this error.
    pub fn envelope(&self) -> ErrorEnvelope {
        let result = if self.code == CODE_BAD_INPUT {
            serde_json::Value::Object(serde_json::Map::new())
        } else {
            serde_json::Value::Null
        };
        ErrorEnvelope {
            errors: vec![self.item()],
            success: false,
            result,
            messages: Vec::new(),
        }
    }

    /// The serialised envelope, ready to be sent with [`ApiError::status`] and
    /// `content-type: application/json`.
    pub fn to_json(&self) -> String {
        self.envelope().to_json()
    }
}

/// Cloudflare v4 error envelope. Field order (and so JSON key order) is
/// `errors`, `success`, `result`, `messages`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorEnvelope {
    /// One item per error; this crate always produces exactly one.
    pub errors: Vec<ErrorItem>,
    /// Always `false`.
    pub success: bool,
    /// `{}` for bad input (5006), `null` otherwise.
    pub result: serde_json::Value,
    /// Always empty.
    pub messages: Vec<serde_json::Value>,
}

impl ErrorEnvelope {
    /// Serialise to compact JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain strings, numbers and `Value`s cannot fail; the
        // fallback only exists so that no code path can panic.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(
                r#"{"errors":[{"code":3000,"message":"AiError: Internal error: failed to serialize error"}],"success":false,"result":null,"messages":[]}"#,
            )
        })
    }
}

/// One `{code, message}` entry of an envelope's `errors` array.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorItem {
    /// Cloudflare internal error code.
    pub code: u32,
    /// Human-readable message.
    pub message: String,
}

impl From<&ApiError> for ErrorItem {
    fn from(err: &ApiError) -> Self {
        err.item()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_envelope_is_byte_exact() {
        let err = ApiError::bad_input("required properties at '/' are 'prompt' or 'messages'");
        assert_eq!(err.status, 400);
        assert_eq!(err.code, 5006);
        assert_eq!(
            err.to_json(),
            r#"{"errors":[{"code":5006,"message":"AiError: Bad input: required properties at '/' are 'prompt' or 'messages'"}],"success":false,"result":{},"messages":[]}"#
        );
    }

    #[test]
    fn authentication_envelope_is_byte_exact() {
        let err = ApiError::authentication();
        assert_eq!(err.status, 401);
        assert_eq!(
            err.to_json(),
            r#"{"errors":[{"code":10000,"message":"Authentication error"}],"success":false,"result":null,"messages":[]}"#
        );
    }

    #[test]
    fn display_is_the_message() {
        let err = ApiError::no_such_model("@cf/x/y");
        assert_eq!(err.to_string(), "No such model @cf/x/y or task");
        assert_eq!((err.status, err.code), (400, 5007));
    }

    #[test]
    fn constructors_have_documented_status_code_and_text() {
        let cases: Vec<(ApiError, u16, u32, &str)> = vec![
            (
                ApiError::forbidden("token lacks permission"),
                403,
                10000,
                "Authentication error: token lacks permission",
            ),
            (
                ApiError::request_too_large(1024),
                413,
                3006,
                "Request is too large: body exceeds 1024 bytes",
            ),
            (
                ApiError::context_window_exceeded(8000, 256, 7968),
                400,
                5006,
                "AiError: Bad input: prompt has 8000 tokens and max_tokens is 256; together \
                 they exceed the model's context window of 7968 tokens",
            ),
            (
                ApiError::capacity(),
                429,
                3040,
                "Capacity temporarily exceeded, please try again.",
            ),
            (ApiError::no_route(), 400, 7000, "No route for that URI"),
            (
                ApiError::method_not_allowed(),
                405,
                7001,
                "Method not supported for requested URI.",
            ),
            (
                ApiError::method_not_supported("GET"),
                405,
                7001,
                "GET not supported for requested URI.",
            ),
            (
                ApiError::internal("boom"),
                500,
                3000,
                "AiError: Internal error: boom",
            ),
            (
                ApiError::unavailable("model is loading"),
                503,
                3040,
                "model is loading",
            ),
            (ApiError::timeout(), 408, 3007, "Request timeout"),
            (
                ApiError::lora_unsupported(),
                405,
                5005,
                "This model does not support LoRa inference",
            ),
            (
                ApiError::json_mode_with_stream(),
                400,
                5023,
                "AiError: JSON Schema mode is not supported with stream mode",
            ),
        ];
        for (err, status, code, message) in cases {
            assert_eq!(err.status, status, "{message}");
            assert_eq!(err.code, code, "{message}");
            assert_eq!(err.message, message);
        }
    }

    #[test]
    fn result_is_object_only_for_bad_input() {
        assert_eq!(
            ApiError::context_window_exceeded(1, 2, 3).envelope().result,
            serde_json::json!({})
        );
        for err in [
            ApiError::capacity(),
            ApiError::no_route(),
            ApiError::json_mode_with_stream(),
            ApiError::internal("x"),
        ] {
            assert_eq!(err.envelope().result, serde_json::Value::Null);
        }
    }

    #[test]
    fn capacity_and_no_route_envelopes() {
        assert_eq!(
            ApiError::capacity().to_json(),
            r#"{"errors":[{"code":3040,"message":"Capacity temporarily exceeded, please try again."}],"success":false,"result":null,"messages":[]}"#
        );
        assert_eq!(
            ApiError::no_route().to_json(),
            r#"{"errors":[{"code":7000,"message":"No route for that URI"}],"success":false,"result":null,"messages":[]}"#
        );
    }

    #[test]
    fn messages_are_json_escaped() {
        let err = ApiError::no_such_model("a\"b\nc");
        assert_eq!(
            err.to_json(),
            r#"{"errors":[{"code":5007,"message":"No such model a\"b\nc or task"}],"success":false,"result":null,"messages":[]}"#
        );
    }

    #[test]
    fn envelope_round_trips() {
        let env = ApiError::bad_input("x").envelope();
        let back: ErrorEnvelope = serde_json::from_str(&env.to_json()).unwrap();
        assert_eq!(back, env);
        assert_eq!(ErrorItem::from(&ApiError::timeout()).code, 3007);
    }
}
