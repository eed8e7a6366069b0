//! The Workers binding protocol (reference §6.1): what the Workers runtime's `env.AI` sends to
//! the service bound as its `fetcher`, so that a node can stand where Cloudflare's inference
//! service stands behind a Worker's `AI` binding.
//!
//! `env.AI.run(model, inputs, options)` sends `POST /run?version=3` with the model in the
//! [`MODEL_HEADER`] header and the body `{"inputs":{..},"options":{..}}`: `inputs` is exactly a
//! Workers AI run body (validated by [`ValidatedRequest`]), `options` what the caller passed
//! (minus `prefix`, `extraHeaders`, `signal`; `rejectIfBusy` is honoured, the rest ignored).
//! The answer is the bare model output, never the v4 envelope: the runtime parses it only when
//! its `content-type` is exactly `application/json`, and hands a `text/event-stream` body back
//! as the stream it is. On a non-2xx answer it throws an `InferenceUpstreamError` built from
//! the body ([`error_body`]): its `name`, and the message `"<internalCode>: <description>"`.
//! `env.AI.models()` sends `GET /ai-api/models/search` and returns the answer's `result`.

use serde::Serialize;
use serde_json::Value;

use crate::error::{ApiError, ErrorItem};
use crate::limits::RequestLimits;
use crate::query::query_param;
use crate::ValidatedRequest;

/// The header naming the model (`<prefix>:<model>` when the caller set `options.prefix`).
pub const MODEL_HEADER: &str = "cf-consn-model-id";

/// The only version of the protocol the node speaks: the current runtime's.
pub const PROTOCOL_VERSION: &str = "3";

/// Checks the `version` query parameter of `/run` (the query string without `?`): only `3` is
/// spoken (`@cloudflare/ai` 1.1.0's version 2 gzips its answers, 1.0.x spoke tensors). Anything
/// else is 400/7000 saying which version the node speaks.
pub fn check_version(query: Option<&str>) -> Result<(), ApiError> {
    match query_param(query, "version") {
        Some(v) if v == PROTOCOL_VERSION => Ok(()),
        other => Err(ApiError::new(
            400,
            7000,
            format!(
                "No route for that URI: this node speaks version {PROTOCOL_VERSION} of the Workers \
                 AI binding protocol (POST /run?version={PROTOCOL_VERSION}), not {}",
                other.map_or_else(|| "a request without a version".to_string(), |v| {
                    format!("version {v:?}")
                })
            ),
        )),
    }
}

/// The model named by the [`MODEL_HEADER`] header: 400/3003 (Workers AI's "incomplete
/// request") when it is missing or empty.
pub fn model_from_header(value: Option<&str>) -> Result<String, ApiError> {
    match value.map(str::trim) {
        Some(model) if !model.is_empty() => Ok(model.to_string()),
        _ => Err(ApiError::new(
            400,
            3003,
            format!(
                "Request is missing headers or body: the {MODEL_HEADER} header naming the model"
            ),
        )),
    }
}

/// Validates a binding body `{"inputs":{..},"options":{..}}`: `inputs` exactly as a run body
/// (the same errors, with paths under `/`), `options` an object whose `rejectIfBusy` is
/// honoured (other options, `gateway`, `returnRawResponse`, `tags`, ..., are the runtime's or
/// Cloudflare's and are ignored). Within the default limits ([`RequestLimits::DEFAULT`]).
pub fn parse_body(body: &[u8]) -> Result<ValidatedRequest, ApiError> {
    parse_body_with(body, &RequestLimits::DEFAULT)
}

/// [`parse_body`] within `limits` (the node's configured ones).
pub fn parse_body_with(body: &[u8], limits: &RequestLimits) -> Result<ValidatedRequest, ApiError> {
    let (inputs, reject_if_busy) = split_body(body)?;
    let mut request = ValidatedRequest::from_value_with(inputs, limits)?;
    request.reject_if_busy |= reject_if_busy;
    Ok(request)
}

/// A binding body for an embedding model: `inputs` as a Workers AI embedding run body
/// ([`crate::embeddings::EmbeddingRun`]); `options` checked as for text generation (an
/// embedding job never waits behind generations, so `rejectIfBusy` changes nothing).
pub fn parse_embedding_body(body: &[u8]) -> Result<crate::embeddings::EmbeddingRun, ApiError> {
    let (inputs, _) = split_body(body)?;
    crate::embeddings::EmbeddingRun::from_value(&inputs)
}

/// `inputs` (an object) and `options.rejectIfBusy` of a binding body.
fn split_body(body: &[u8]) -> Result<(Value, bool), ApiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_input(format_args!("body is not valid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::bad_input(
            "the binding's body must be an object {\"inputs\":{..},\"options\":{..}}",
        ));
    };
    let inputs = match map.remove("inputs") {
        Some(inputs @ Value::Object(_)) => inputs,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_input(
                "required property 'inputs' is missing from the binding's body",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_input(
                "'inputs' of the binding's body must be an object",
            ))
        }
    };
    let reject_if_busy = match map.remove("options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("rejectIfBusy") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(_) => {
                return Err(ApiError::bad_input(
                    "'options.rejectIfBusy' of the binding's body must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_input(
                "'options' of the binding's body must be an object",
            ))
        }
    };
    Ok((inputs, reject_if_busy))
}

/// The binding's error body, the shape the runtime parses first (`internalCode`, `name`,
/// `description`; reference §6.1), with the v4 `errors` array as well (what `env.AI.models()`
/// reads, and any client of the REST shape). `env.AI.run` throws an `InferenceUpstreamError`
/// named [`error_name`] with the message `"<code>: <message>"`, e.g.
/// `5006: AiError: Bad input: 'prompt' and 'messages' are mutually exclusive`.
pub fn error_body(error: &ApiError) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        internal_code: u32,
        name: &'static str,
        message: String,
        description: &'a str,
        errors: Vec<ErrorItem>,
    }
    let name = error_name(error);
    let body = Body {
        internal_code: error.code,
        name,
        message: format!("{name}: {}", error.message),
        description: &error.message,
        errors: vec![error.item()],
    };
    serde_json::to_string(&body).unwrap_or_else(|_| error.to_json())
}

/// The error class the binding's callers see as the thrown error's `name`.
pub fn error_name(error: &ApiError) -> &'static str {
    match (error.status, error.code) {
        (_, crate::error::CODE_BAD_INPUT) | (_, 5023) | (_, 3003) => "InvalidInput",
        (_, crate::error::CODE_NO_SUCH_MODEL) => "NoSuchModel",
        (_, 5005) => "LoRaUnsupported",
        (401 | 403, _) => "AuthenticationError",
        (408, _) => "Timeout",
        (413, _) => "RequestTooLarge",
        (429, _) => "CapacityExceeded",
        (503, _) => "Unavailable",
        (_, 7000) => "NoRoute",
        (_, 7001) => "MethodNotAllowed",
        _ => "InferenceUpstreamError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_version_3_is_spoken() {
        assert_eq!(check_version(Some("version=3")), Ok(()));
        assert_eq!(check_version(Some("a=1&version=3")), Ok(()));
        for query in [None, Some(""), Some("version=2"), Some("version=")] {
            let e = check_version(query).unwrap_err();
            assert_eq!((e.status, e.code), (400, 7000), "{query:?}");
            assert!(e.message.contains("version 3"), "{}", e.message);
        }
        assert!(check_version(Some("version=2"))
            .unwrap_err()
            .message
            .ends_with("not version \"2\""));
    }

    #[test]
    fn the_model_comes_from_the_header() {
        assert_eq!(model_from_header(Some("@cf/meta/x")).unwrap(), "@cf/meta/x");
        for missing in [None, Some(""), Some("  ")] {
            let e = model_from_header(missing).unwrap_err();
            assert_eq!((e.status, e.code), (400, 3003));
            assert!(e.message.contains(MODEL_HEADER));
        }
    }

    #[test]
    fn inputs_are_a_run_body_and_options_may_reject_if_busy() {
        let r = parse_body(br#"{"inputs":{"prompt":"hi","max_tokens":3},"options":{}}"#).unwrap();
        assert_eq!(r.params.max_tokens, 3);
        assert!(!r.reject_if_busy && !r.stream);
        let r = parse_body(
            br#"{"inputs":{"messages":[{"role":"user","content":"hi"}],"stream":true},
                 "options":{"rejectIfBusy":true,"gateway":{"id":"g"},"example":123}}"#,
        )
        .unwrap();
        assert!(r.reject_if_busy && r.stream);
        // Inputs get the run route's own errors.
        let body = json!({"inputs": {"prompt": "a", "messages": []}}).to_string();
        assert_eq!(
            parse_body(body.as_bytes()),
            ValidatedRequest::from_json_bytes(br#"{"prompt":"a","messages":[]}"#)
        );
        for bad in [
            &b"nope"[..],
            b"[]",
            br#"{"options":{}}"#,
            br#"{"inputs":"hi"}"#,
            br#"{"inputs":{"prompt":"hi"},"options":[]}"#,
            br#"{"inputs":{"prompt":"hi"},"options":{"rejectIfBusy":1}}"#,
        ] {
            let e = parse_body(bad).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (400, 5006),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn errors_have_the_shape_the_runtime_parses() {
        let e = ApiError::bad_input("'prompt' and 'messages' are mutually exclusive");
        let v: Value = serde_json::from_str(&error_body(&e)).unwrap();
        assert_eq!(
            v,
            json!({
                "internalCode": 5006,
                "name": "InvalidInput",
                "message": "InvalidInput: AiError: Bad input: 'prompt' and 'messages' are mutually exclusive",
                "description": "AiError: Bad input: 'prompt' and 'messages' are mutually exclusive",
                "errors": [{"code": 5006, "message": "AiError: Bad input: 'prompt' and 'messages' are mutually exclusive"}],
            })
        );
        assert_eq!(error_name(&ApiError::no_such_model("x")), "NoSuchModel");
        assert_eq!(
            error_name(&ApiError::authentication()),
            "AuthenticationError"
        );
        assert_eq!(error_name(&ApiError::capacity()), "CapacityExceeded");
        assert_eq!(
            error_name(&ApiError::internal("x")),
            "InferenceUpstreamError"
        );
    }
}
