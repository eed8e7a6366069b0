//! How OpenAI-dialect payloads go on the wire: JSON bodies ([`to_json`]), stream events
//! ([`data_event`], [`error_event`]) and OpenAI's error body ([`ErrorBody`], [`error_body`]),
//! mapped from [`ApiError`]. Depends on [`crate::error`] only, so the route table can pick
//! this body for its `/v1` routes without a cycle.

use serde::Serialize;

use crate::error::ApiError;

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` of an [`ErrorBody`].
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorDetail {
    /// What went wrong.
    pub message: String,
    /// The error's class, from the HTTP status (`invalid_request_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `null` (the message names the field).
    pub param: Option<String>,
    /// `model_not_found`, `invalid_api_key` or `rate_limit_exceeded` where they apply,
    /// else `null`.
    pub code: Option<&'static str>,
}

impl From<&ApiError> for ErrorBody {
    fn from(e: &ApiError) -> Self {
        let kind = match e.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 => "timeout_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let code = match (e.status, e.code) {
            (_, crate::error::CODE_NO_SUCH_MODEL) => Some("model_not_found"),
            (401, _) => Some("invalid_api_key"),
            (429, _) => Some("rate_limit_exceeded"),
            _ => None,
        };
        Self {
            error: ErrorDetail {
                message: e.message.clone(),
                kind,
                param: None,
                code,
            },
        }
    }
}

const FALLBACK_ERROR: &str = r#"{"error":{"message":"failed to serialize the answer","type":"server_error","param":null,"code":null}}"#;

/// Serialises an answer, or (it cannot happen for these types) an error body.
pub fn to_json(payload: &impl Serialize) -> String {
    serde_json::to_string(payload).unwrap_or_else(|_| FALLBACK_ERROR.to_owned())
}

/// OpenAI's error body for `error`, ready to send with [`ApiError::status`].
pub fn error_body(error: &ApiError) -> String {
    to_json(&ErrorBody::from(error))
}

/// `data: <json>\n\n`: one event of an OpenAI stream.
pub fn data_event(payload: &impl Serialize) -> String {
    format!("data: {}\n\n", to_json(payload))
}

/// `data: {"error":{..}}\n\n`: how an OpenAI stream that already started reports a failure
/// (the SDKs raise it); the stream ends after it, without `[DONE]`.
pub fn error_event(error: &ApiError) -> String {
    data_event(&ErrorBody::from(error))
}
