//! The OpenAI-compatible dialect (reference §4): `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`, and Workers AI's own
//! `POST /client/v4/accounts/{id}/ai/v1/chat/completions`.
//!
//! Validation is `edgerun-protocol`'s ([`OpenAiRequest`]); the model comes from the body and
//! must be one the node serves (404 `model_not_found` on `/v1`, Workers AI's 400 / 5007 on its
//! route). Defaults the request leaves open are resolved here, once: `max_tokens` 256 for chat
//! (Workers AI's default) and 16 for legacy completions (OpenAI's), `temperature` 1 and
//! `top_p` 1 (OpenAI's), no penalties, a random seed. Legacy completions continue the prompt as
//! it is (no chat template).
//!
//! Answers are plain OpenAI JSON on both route families (no v4 envelope, as Workers AI answers
//! there); errors before the first byte are OpenAI's `{"error":{..}}` on `/v1` and the v4
//! envelope on Workers AI's route ([`ErrorStyle::of_path`]). A stream is: the role chunk (chat),
//! one chunk per text delta (with its tokens' log-probabilities when asked for), a chunk with
//! an empty delta and the `finish_reason`, with `stream_options.include_usage` a chunk with
//! `usage` and no choices, then `data: [DONE]`; a failure after the first byte is an
//! `data: {"error":{..}}` event that ends the stream.

use super::{json_response, read_body};
use crate::error::{ErrorStyle, ServerError};
use crate::generation::{self, Completion, Framing, GenerationInput};
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use edgerun_engine::{
    ChatMessage, Logprobs, PromptInput, SamplingConfig, StopCriteria, StopReason, TokenLogprob,
    ToolCall, Usage,
};
use edgerun_protocol::openai::{
    self, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatTokenLogprob, Chunk, CompletionChoice, CompletionLogprobs, FinishReason, FunctionCallOut,
    ModelList, TextCompletion, ToolCallOut, TopLogprob,
};
use edgerun_protocol::{
    sse, ApiError, OpenAiBase, OpenAiEndpoint, OpenAiInput, OpenAiRequest, OpenAiRoute,
    DEFAULT_MAX_TOKENS,
};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// `max_tokens` of a legacy completion that does not say (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;
/// `temperature` when the request does not say (OpenAI's default).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// When this process first served (the `created` of every model it lists).
static SERVING_SINCE: OnceLock<u64> = OnceLock::new();

/// Notes when the node started serving (called when the router is built).
pub(super) fn note_start() {
    SERVING_SINCE.get_or_init(unix_now);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST .../chat/completions`.
pub(super) async fn chat_completions(
    State(state): State<AppState>,
    uri: Uri,
    body: Body,
) -> Response {
    answer(&state, &uri, body, OpenAiEndpoint::ChatCompletions).await
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(state): State<AppState>, uri: Uri, body: Body) -> Response {
    answer(&state, &uri, body, OpenAiEndpoint::Completions).await
}

/// `GET /v1/models`: every name the node answers to.
pub(super) async fn models(State(state): State<AppState>) -> Response {
    let since = *SERVING_SINCE.get_or_init(unix_now);
    json_response(openai::to_json(&ModelList::new(&state.all_names(), since)))
}

/// `GET /v1/models/{id}`: one name the node answers to (the id percent-decoded), or 404
/// `model_not_found` in OpenAI's shape.
pub(super) async fn model(State(state): State<AppState>, uri: Uri) -> Response {
    let since = *SERVING_SINCE.get_or_init(unix_now);
    match edgerun_protocol::openai_model_id(uri.path()) {
        Some(id) if state.serves(&id) || state.embedder(&id).is_some() => {
            json_response(openai::to_json(&ModelList::new(&[id], since).data[0]))
        }
        Some(id) => {
            ServerError::from(ApiError::model_not_found(&id)).into_response_as(ErrorStyle::OpenAi)
        }
        None => ServerError::from(ApiError::no_route()).into_response_as(ErrorStyle::OpenAi),
    }
}

async fn answer(state: &AppState, uri: &Uri, body: Body, endpoint: OpenAiEndpoint) -> Response {
    let style = ErrorStyle::of_path(uri.path());
    // The router's patterns are wider than the shared rule (an empty account segment, say):
    // what the rule does not call this route is no route, as the Worker answers it.
    let result = match OpenAiRoute::of(uri.path()) {
        Some(route) if route.endpoint == endpoint => answer_inner(state, route, body).await,
        _ => Err(ApiError::no_route().into()),
    };
    result.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "request rejected");
        e.into_response_as(style)
    })
}

async fn answer_inner(
    state: &AppState,
    route: OpenAiRoute,
    body: Body,
) -> Result<Response, ServerError> {
    let started = Instant::now();
    let bytes = read_body(body, &state.body).await?;
    let request = OpenAiRequest::from_json_bytes_with(route.endpoint, &bytes, &state.limits)?;
    let Some(slot) = state.generator(&request.model) else {
        return Err(match route.base {
            OpenAiBase::V1 => ApiError::model_not_found(&request.model),
            OpenAiBase::WorkersAi => ApiError::no_such_model(&request.model),
        }
        .into());
    };
    let shape = Shape::new(route.endpoint, &request);
    let stream = request.stream;
    let generation = generation::start(
        state,
        slot,
        generation_input(route.endpoint, request),
        started,
    )
    .await?;
    if stream {
        generation
            .stream(OpenAiStream::new(shape), state.heartbeat)
            .await
    } else {
        Ok(json_response(shape.whole(generation.collect().await?)))
    }
}

/// A validated request in the engine's terms, every default resolved.
pub(crate) fn generation_input(endpoint: OpenAiEndpoint, r: OpenAiRequest) -> GenerationInput {
    let (prompt, default_max_tokens) = match r.input {
        OpenAiInput::Chat(messages) => (
            PromptInput::Messages(
                messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        name: m.name,
                        tool_call_id: m.tool_call_id,
                        tool_calls: m.tool_calls,
                        ..ChatMessage::new(m.role, m.content)
                    })
                    .collect(),
            ),
            DEFAULT_MAX_TOKENS,
        ),
        OpenAiInput::Prompt(text) => (
            PromptInput::Prompt { text, raw: true },
            DEFAULT_COMPLETION_MAX_TOKENS,
        ),
    };
    debug_assert!(endpoint != OpenAiEndpoint::Models);
    let (tools, tool_choice) = generation::engine_tools(r.tools, r.tool_choice);
    GenerationInput {
        prompt,
        tools,
        tool_choice,
        sampling: SamplingConfig {
            temperature: r.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_k: r.top_k.map_or(0, |k| k as usize),
            top_p: r.top_p.unwrap_or(1.0),
            seed: generation::resolve_seed(r.seed),
            repetition_penalty: r.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
            presence_penalty: r.presence_penalty.unwrap_or(0.0),
            logprobs: match r.logprobs {
                None => Logprobs::Off,
                Some(top) => Logprobs::Report { top: top as usize },
            },
        },
        stopping: StopCriteria {
            max_tokens: r.max_tokens.unwrap_or(default_max_tokens) as usize,
            stop: r.stop,
        },
        format: generation::output_format(&r.response_format),
        policy: generation::queue_policy(r.reject_if_busy),
    }
}

/// OpenAI's name for why a choice ended (`tool_calls` when it made calls).
fn finish_reason(reason: StopReason, called: bool) -> FinishReason {
    if reason.is_length() {
        "length"
    } else if called {
        "tool_calls"
    } else {
        "stop"
    }
}

/// The calls in OpenAI's shape, with fresh ids (`index` set for stream chunks).
fn tool_calls_out(calls: &[ToolCall], indexed: bool) -> Vec<ToolCallOut> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| ToolCallOut {
            index: indexed.then_some(i as u32),
            id: format!("call_{:024x}", rand::random::<u128>() >> 32),
            kind: "function",
            function: FunctionCallOut {
                name: c.name.clone(),
                arguments: c.arguments.to_string(),
            },
        })
        .collect()
}

/// A token's text as OpenAI reports it: its bytes, lossily when they end inside a character.
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn chat_logprobs(logprobs: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: logprobs
            .iter()
            .map(|t| ChatTokenLogprob {
                token: token_text(&t.chosen.bytes),
                logprob: t.chosen.logprob,
                bytes: t.chosen.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|e| TopLogprob {
                        token: token_text(&e.bytes),
                        logprob: e.logprob,
                        bytes: e.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
        refusal: None,
    }
}

/// Legacy completion log-probabilities; `offset` is where the first token starts in the
/// choice's text, advanced past these tokens.
fn completion_logprobs(logprobs: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in logprobs {
        out.tokens.push(token_text(&t.chosen.bytes));
        out.token_logprobs.push(t.chosen.logprob);
        out.top_logprobs.push(
            t.top
                .iter()
                .map(|e| (token_text(&e.bytes), e.logprob))
                .collect(),
        );
        out.text_offset.push(*offset);
        *offset += t.chosen.bytes.len();
    }
    out
}

/// What every answer to one request shares.
struct Shape {
    endpoint: OpenAiEndpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
}

impl Shape {
    fn new(endpoint: OpenAiEndpoint, request: &OpenAiRequest) -> Self {
        let prefix = match endpoint {
            OpenAiEndpoint::Completions => "cmpl",
            _ => "chatcmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: unix_now(),
            model: request.model.clone(),
            logprobs: request.logprobs.is_some(),
            include_usage: request.include_usage,
        }
    }

    /// The non-streamed answer.
    fn whole(&self, done: Completion) -> String {
        let finish_reason = finish_reason(done.reason, !done.tool_calls.is_empty());
        let usage = generation::wire_usage(&done.usage);
        match self.endpoint {
            OpenAiEndpoint::Completions => openai::to_json(&TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: done.text,
                    logprobs: self
                        .logprobs
                        .then(|| completion_logprobs(&done.logprobs, &mut 0)),
                    finish_reason: Some(finish_reason),
                }],
                usage,
            }),
            _ => openai::to_json(&ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: (done.tool_calls.is_empty() || !done.text.is_empty())
                            .then_some(done.text),
                        refusal: None,
                        tool_calls: (!done.tool_calls.is_empty())
                            .then(|| tool_calls_out(&done.tool_calls, false)),
                    },
                    logprobs: self.logprobs.then(|| chat_logprobs(&done.logprobs)),
                    finish_reason,
                }],
                usage,
            }),
        }
    }

    /// One `data:` chunk with `choices` (`usage` is `null` when the usage chunk will follow).
    fn chunk<C: serde::Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> String {
        let object = match self.endpoint {
            OpenAiEndpoint::Completions => "text_completion",
            _ => "chat.completion.chunk",
        };
        openai::data_event(&Chunk {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self
                .include_usage
                .then(|| usage.as_ref().map(generation::wire_usage)),
        })
    }
}

/// Frames a generation as OpenAI chunks.
struct OpenAiStream {
    shape: Shape,
    /// The chat role chunk went out.
    opened: bool,
    /// Where the next token starts in the text (legacy completion logprobs).
    offset: usize,
    /// Tool calls went out (the finish reason is `tool_calls`).
    called: bool,
}

impl OpenAiStream {
    fn new(shape: Shape) -> Self {
        Self {
            shape,
            opened: false,
            offset: 0,
            called: false,
        }
    }

    /// The first chunk of a chat stream: the role, empty content.
    fn open(&mut self) -> String {
        if self.opened || self.shape.endpoint == OpenAiEndpoint::Completions {
            return String::new();
        }
        self.opened = true;
        self.shape.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        )
    }

    /// A chunk with new text, the end of the choice, or both.
    fn delta(
        &mut self,
        text: Option<&str>,
        logprobs: &[TokenLogprob],
        finish: Option<FinishReason>,
    ) -> String {
        let with_logprobs = self.shape.logprobs && text.is_some();
        match self.shape.endpoint {
            OpenAiEndpoint::Completions => {
                let logprobs =
                    with_logprobs.then(|| completion_logprobs(logprobs, &mut self.offset));
                self.shape.chunk(
                    vec![CompletionChoice {
                        index: 0,
                        text: text.unwrap_or_default().to_string(),
                        logprobs,
                        finish_reason: finish,
                    }],
                    None,
                )
            }
            _ => self.shape.chunk(
                vec![ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta {
                        role: None,
                        content: text.map(str::to_string),
                        tool_calls: None,
                    },
                    logprobs: with_logprobs.then(|| chat_logprobs(logprobs)),
                    finish_reason: finish,
                }],
                None,
            ),
        }
    }
}

impl Framing for OpenAiStream {
    /// A chat stream opens with the role chunk at once, as OpenAI's does, whatever the engine
    /// is doing (a forced tool call's text is held back until the end).
    fn opening(&mut self) -> String {
        self.open()
    }

    fn token(&mut self, text: &str, logprobs: &[TokenLogprob]) -> String {
        let mut out = self.open();
        out.push_str(&self.delta(Some(text), logprobs, None));
        out
    }

    fn tool_calls(&mut self, calls: &[ToolCall]) -> String {
        self.called = true;
        let mut out = self.open();
        out.push_str(&self.shape.chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: None,
                    content: None,
                    tool_calls: Some(tool_calls_out(calls, true)),
                },
                logprobs: None,
                finish_reason: None,
            }],
            None,
        ));
        out
    }

    fn finish(&mut self, usage: &Usage, reason: StopReason) -> String {
        let mut out = self.open();
        out.push_str(&self.delta(None, &[], Some(finish_reason(reason, self.called))));
        if self.shape.include_usage {
            out.push_str(
                &self
                    .shape
                    .chunk::<ChatChunkChoice>(Vec::new(), Some(*usage)),
            );
        }
        out.push_str(sse::DONE_EVENT);
        out
    }

    fn error(&mut self, error: &ApiError) -> String {
        openai::error_event(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgerun_engine::LogprobEntry;
    use edgerun_engine::QueuePolicy;
    use serde_json::{json, Value};

    fn request(endpoint: OpenAiEndpoint, body: Value) -> OpenAiRequest {
        OpenAiRequest::from_json_bytes(endpoint, body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn defaults_are_resolved_per_endpoint() {
        let chat = request(
            OpenAiEndpoint::ChatCompletions,
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        );
        let input = generation_input(OpenAiEndpoint::ChatCompletions, chat);
        assert_eq!(input.stopping, StopCriteria::max_tokens(256));
        let s = input.sampling;
        assert_eq!((s.temperature, s.top_k, s.top_p), (1.0, 0, 1.0));
        assert_eq!(s.logprobs, Logprobs::Off);
        assert_eq!(input.policy, QueuePolicy::Wait);
        let PromptInput::Messages(m) = input.prompt else {
            panic!("messages expected")
        };
        assert_eq!(m, [ChatMessage::new("user", "hi")]);

        let completion = request(
            OpenAiEndpoint::Completions,
            json!({"model": "m", "prompt": "Once", "logprobs": 2, "stop": ["\n"],
                   "seed": 5, "temperature": 0, "options": {"rejectIfBusy": true}}),
        );
        let input = generation_input(OpenAiEndpoint::Completions, completion);
        assert_eq!(
            input.prompt,
            PromptInput::Prompt {
                text: "Once".into(),
                raw: true
            }
        );
        assert_eq!(
            input.stopping,
            StopCriteria {
                max_tokens: 16,
                stop: vec!["\n".into()]
            }
        );
        assert_eq!(input.sampling.logprobs, Logprobs::Report { top: 2 });
        assert_eq!((input.sampling.seed, input.sampling.temperature), (5, 0.0));
        assert_eq!(input.policy, QueuePolicy::RejectIfBusy);
    }

    fn shape(endpoint: OpenAiEndpoint, logprobs: bool, include_usage: bool) -> Shape {
        Shape {
            endpoint,
            id: "id".into(),
            created: 1,
            model: "m".into(),
            logprobs,
            include_usage,
        }
    }

    fn events(frames: &str) -> Vec<Value> {
        frames
            .split("\n\n")
            .filter(|f| !f.is_empty())
            .map(|f| {
                let data = f.strip_prefix("data: ").unwrap();
                serde_json::from_str(data).unwrap_or(Value::String(data.into()))
            })
            .collect()
    }

    fn logprob(bytes: &[u8], lp: f32) -> TokenLogprob {
        let entry = LogprobEntry {
            id: 0,
            bytes: bytes.to_vec(),
            logprob: lp,
        };
        TokenLogprob {
            chosen: entry.clone(),
            top: vec![entry],
        }
    }

    #[test]
    fn a_chat_stream_is_role_deltas_finish_usage_done() {
        let mut s = OpenAiStream::new(shape(OpenAiEndpoint::ChatCompletions, false, true));
        let mut frames = s.token("Hel", &[]);
        frames += &s.token("lo", &[]);
        frames += &s.finish(
            &Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 0,
            },
            StopReason::MaxTokens,
        );
        let e = events(&frames);
        assert_eq!(e.len(), 6, "{e:?}");
        assert_eq!(
            e[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(e[0]["object"], "chat.completion.chunk");
        assert_eq!(e[0]["usage"], Value::Null);
        assert_eq!(e[1]["choices"][0]["delta"], json!({"content": "Hel"}));
        assert_eq!(e[2]["choices"][0]["delta"], json!({"content": "lo"}));
        assert_eq!(e[3]["choices"][0]["delta"], json!({}));
        assert_eq!(e[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(e[4]["choices"], json!([]));
        assert_eq!(e[4]["usage"]["total_tokens"], 5);
        assert_eq!(e[5], "[DONE]");
        // Without include_usage: no usage member, no usage chunk.
        let mut s = OpenAiStream::new(shape(OpenAiEndpoint::ChatCompletions, false, false));
        let e = events(&s.finish(&Usage::default(), StopReason::StopString));
        assert_eq!(e.len(), 3);
        assert!(e[0].get("usage").is_none());
        assert_eq!(e[1]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn completion_streams_carry_text_and_offsets() {
        let mut s = OpenAiStream::new(shape(OpenAiEndpoint::Completions, true, false));
        let mut frames = s.token("ab", &[logprob(b"a", -0.5), logprob(b"b", -1.0)]);
        frames += &s.token("c", &[logprob(b"c", -0.25)]);
        frames += &s.finish(&Usage::default(), StopReason::EndOfTurn);
        let e = events(&frames);
        assert_eq!(e[0]["object"], "text_completion");
        assert_eq!(e[0]["choices"][0]["text"], "ab");
        assert_eq!(e[0]["choices"][0]["logprobs"]["tokens"], json!(["a", "b"]));
        assert_eq!(e[0]["choices"][0]["logprobs"]["text_offset"], json!([0, 1]));
        assert_eq!(e[1]["choices"][0]["logprobs"]["text_offset"], json!([2]));
        assert_eq!(
            e[1]["choices"][0]["logprobs"]["top_logprobs"],
            json!([{"c": -0.25}])
        );
        assert_eq!(e[2]["choices"][0]["finish_reason"], "stop");
        assert_eq!(e[2]["choices"][0]["logprobs"], Value::Null);
        assert_eq!(e[3], "[DONE]");
    }

    #[test]
    fn whole_answers_have_openais_shape() {
        let done = Completion {
            text: "hi".into(),
            tool_calls: Vec::new(),
            logprobs: vec![logprob(b"h", -0.1), logprob(&[0xC3], -2.0)],
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                cached_tokens: 0,
            },
            reason: StopReason::EndOfTurn,
        };
        let v: Value = serde_json::from_str(
            &shape(OpenAiEndpoint::ChatCompletions, true, false).whole(done.clone()),
        )
        .unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "hi", "refusal": null})
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let content = &v["choices"][0]["logprobs"]["content"];
        assert_eq!(content[0]["token"], "h");
        assert_eq!(content[0]["bytes"], json!([104]));
        // Half a character: the token is lossy, the bytes exact.
        assert_eq!(content[1]["token"], "\u{FFFD}");
        assert_eq!(content[1]["bytes"], json!([195]));
        assert_eq!(content[1]["top_logprobs"][0]["logprob"], -2.0);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        let v: Value =
            serde_json::from_str(&shape(OpenAiEndpoint::Completions, false, false).whole(done))
                .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "hi");
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
    }
}
