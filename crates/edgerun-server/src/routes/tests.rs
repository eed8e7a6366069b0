//! Every route over the fake backend ([`crate::fake`]): success and error shapes per dialect,
//! the SSE framing of each event kind, heartbeats, a client hanging up, and the mapping of
//! backend answers (busy, a format the generation cannot meet, a failure mid-stream) to the
//! wire. No model: these run with the unit tests.

use crate::fake::{token, FakeBackend, Script, Step};
use crate::{router, AppState, TokenSet};
use axum::body::{to_bytes, Body};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use edgerun_engine::{EngineError, GenerationEvent, Health, PromptInput, StopReason, Usage};
use edgerun_protocol::{sse, ApiError};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tower::ServiceExt;

const MODEL: &str = "@cf/meta/llama-3-8b-instruct";

fn node(script: Script) -> (Router, FakeBackend) {
    let fake = FakeBackend::new(script);
    let mut state = AppState::new(vec![MODEL.to_string()], TokenSet::new(Vec::<String>::new()));
    state.heartbeat = Duration::from_millis(50);
    assert!(state.set_backend(fake.clone()));
    (router(state), fake)
}

async fn send(app: Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn post(uri: &str, body: Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn run(body: Value) -> Request<Body> {
    post(&format!("/run/{MODEL}"), body)
}

fn chat(body: Value) -> Request<Body> {
    let mut body = body;
    body["model"] = json!(MODEL);
    body["messages"] = json!([{"role": "user", "content": "hi"}]);
    post("/v1/chat/completions", body)
}

fn binding(inputs: Value) -> Request<Body> {
    Request::post("/run?version=3")
        .header("content-type", "application/json")
        .header("cf-consn-model-id", MODEL)
        .body(Body::from(
            json!({"inputs": inputs, "options": {}}).to_string(),
        ))
        .unwrap()
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `data:` payloads of an SSE body, parsed; `[DONE]` as the string "[DONE]".
fn data_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                json!("[DONE]")
            } else {
                json_of(d)
            }
        })
        .collect()
}

fn usage(prompt: usize, completion: usize) -> GenerationEvent {
    GenerationEvent::Finished {
        usage: Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: 0,
        },
        reason: StopReason::EndOfTurn,
    }
}

fn wire_usage(prompt: u32, completion: u32) -> edgerun_protocol::Usage {
    edgerun_protocol::Usage::new(prompt, completion).with_cached_tokens(0)
}

#[tokio::test]
async fn run_answers_json_in_cloudflares_envelope() {
    for uri in [
        format!("/run/{MODEL}"),
        format!("/client/v4/accounts/abc/ai/run/{MODEL}"),
    ] {
        let (app, fake) = node(Script::tokens(&["Hel", "lo"]));
        let (status, headers, body) = send(app, post(&uri, json!({"prompt": "hi"}))).await;
        assert_eq!(status, 200, "{uri}: {body}");
        assert_eq!(headers["content-type"], "application/json");
        let v = json_of(&body);
        assert_eq!(v["success"], true, "{body}");
        assert_eq!(v["result"]["response"], "Hello", "{body}");
        assert_eq!(v["result"]["usage"]["prompt_tokens"], 5);
        assert_eq!(v["result"]["usage"]["completion_tokens"], 2);
        // What the route handed the backend.
        let seen = fake.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].prompt,
            Some(PromptInput::Prompt {
                text: "hi".into(),
                raw: false
            })
        );
        assert_eq!(seen[0].format, Some(edgerun_engine::OutputFormat::Text));
    }
}

/// Every answer carries the node's load for the Worker, numbered so that the Worker can keep
/// the newest when answers overtake each other (`edgerun_protocol::NodeLoad`).
#[tokio::test]
async fn answers_carry_numbered_load_reports() {
    let (app, _) = node(Script::tokens(&["ok"]));
    let mut last = 0;
    for req in [
        run(json!({"prompt": "hi"})),
        Request::get("/health").body(Body::empty()).unwrap(),
        chat(json!({})),
    ] {
        let (status, headers, body) = send(app.clone(), req).await;
        assert_eq!(status, 200, "{body}");
        let value = headers[edgerun_protocol::LOAD_HEADER].to_str().unwrap();
        let load = edgerun_protocol::NodeLoad::parse(value).unwrap();
        let seq = load.seq.unwrap_or_else(|| panic!("unnumbered: {value}"));
        assert!(seq > last, "{seq} after {last}");
        last = seq;
    }
}

#[tokio::test]
async fn run_streams_each_event_kind_in_workers_ai_frames() {
    let (app, _) = node(Script::tokens(&["Hel", "lo"]));
    let (status, headers, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], sse::EVENT_STREAM_CONTENT_TYPE);
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    // Prompt progress sends nothing; each token a frame; the end usage and [DONE].
    let expected = format!(
        "{}{}{}{}",
        sse::token_event("Hel"),
        sse::token_event("lo"),
        sse::usage_event(&wire_usage(5, 2)),
        sse::DONE_EVENT
    );
    assert_eq!(body, expected);
}

#[tokio::test]
async fn the_binding_answers_bare_and_streams_the_same_frames() {
    let (app, _) = node(Script::tokens(&["Hel", "lo"]));
    let (status, _, body) = send(app, binding(json!({"prompt": "hi"}))).await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["response"], "Hello", "{body}");
    assert!(v.get("success").is_none(), "no envelope: {body}");

    let (app, _) = node(Script::tokens(&["Hel", "lo"]));
    let (status, _, body) = send(app, binding(json!({"prompt": "hi", "stream": true}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with(&sse::token_event("Hel")), "{body}");
    assert!(body.ends_with(sse::DONE_EVENT), "{body}");
}

#[tokio::test]
async fn openai_chat_answers_json_and_streams_chunks() {
    let (app, _) = node(Script::tokens(&["Hel", "lo"]));
    let (status, _, body) = send(app, chat(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "chat.completion", "{body}");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 7);

    let (app, _) = node(Script::tokens(&["Hel", "lo"]));
    let (status, headers, body) = send(app, chat(json!({"stream": true}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], sse::EVENT_STREAM_CONTENT_TYPE);
    let events = data_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]", "{body}");
    // The role chunk opens the stream, then one chunk per token, then the finish reason.
    assert_eq!(events[0]["object"], "chat.completion.chunk", "{body}");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello", "{body}");
    assert!(
        events
            .iter()
            .any(|e| e["choices"][0]["finish_reason"] == "stop"),
        "{body}"
    );
    // Every chunk has the same id.
    let id = &events[0]["id"];
    assert!(events[..events.len() - 1].iter().all(|e| &e["id"] == id));
}

#[tokio::test]
async fn openai_completions_answer_text() {
    let (app, fake) = node(Script::tokens(&["Hel", "lo"]));
    let (status, _, body) = send(
        app,
        post("/v1/completions", json!({"model": MODEL, "prompt": "hi"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "text_completion", "{body}");
    assert_eq!(v["choices"][0]["text"], "Hello");
    assert!(matches!(
        fake.seen()[0].prompt,
        Some(PromptInput::Prompt { raw: true, .. })
    ));
}

#[tokio::test]
async fn a_full_queue_is_429_with_retry_after_and_not_started_in_each_dialect() {
    for (req, openai) in [
        (run(json!({"prompt": "hi"})), false),
        (run(json!({"prompt": "hi", "stream": true})), false),
        (chat(json!({})), true),
        (chat(json!({"stream": true})), true),
        (binding(json!({"prompt": "hi"})), false),
    ] {
        let (app, _) = node(Script::busy());
        let (status, headers, body) = send(app, req).await;
        assert_eq!(status, 429, "{body}");
        assert!(headers.contains_key("retry-after"), "{headers:?}");
        assert_eq!(headers[edgerun_protocol::NOT_STARTED_HEADER], "1");
        let v = json_of(&body);
        if openai {
            assert!(v["error"]["message"].is_string(), "{body}");
        } else {
            assert!(body.contains("3040"), "{body}");
        }
    }
}

#[tokio::test]
async fn no_backend_yet_is_503_not_started() {
    let app = router(AppState::new(
        vec![MODEL.to_string()],
        TokenSet::new(Vec::<String>::new()),
    ));
    let (status, headers, body) = send(app, run(json!({"prompt": "hi"}))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers[edgerun_protocol::NOT_STARTED_HEADER], "1");
}

#[tokio::test]
async fn a_format_the_generation_cannot_meet_is_400() {
    let unmet = || {
        Script::steps(vec![Step::Event(GenerationEvent::FormatUnmet(
            "no token fits".into(),
        ))])
    };
    // Before any byte: a 400 in the route's shape.
    let (app, _) = node(unmet());
    let (status, _, body) = send(app, run(json!({"prompt": "hi"}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no token fits"), "{body}");
    let (app, _) = node(unmet());
    let (status, headers, body) = send(app, chat(json!({"stream": true}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(!headers.contains_key(edgerun_protocol::NOT_STARTED_HEADER));
    // After the stream started: its error event, and the end.
    let (app, _) = node(Script::steps(vec![
        Step::Event(token("a")),
        Step::Event(GenerationEvent::FormatUnmet("no token fits".into())),
    ]));
    let (status, _, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    assert_eq!(status, 200);
    let expected_error = crate::error::ServerError::FormatUnmet("no token fits".into()).api_error();
    assert_eq!(
        body,
        format!(
            "{}{}",
            sse::token_event("a"),
            sse::error_event(&expected_error)
        )
    );
    assert_eq!(expected_error.status, 400);
}

#[tokio::test]
async fn a_bad_schema_is_400_and_a_failure_at_once_keeps_its_status() {
    let (app, _) = node(Script {
        prepare: Some(|| EngineError::InvalidFormat("unsatisfiable".into())),
        ..Script::tokens(&["x"])
    });
    let (status, _, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("response_format's schema: unsatisfiable"),
        "{body}"
    );
    // The engine failing before the first event: a status, not a stream.
    let (app, _) = node(Script::steps(vec![Step::Event(GenerationEvent::Failed(
        "cannot allocate".into(),
    ))]));
    let (status, _, body) = send(app, chat(json!({"stream": true}))).await;
    assert_eq!(status, 500, "{body}");
    assert!(json_of(&body)["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn a_failure_mid_stream_ends_it_with_an_error_event_in_each_dialect() {
    let failing = || {
        Script::steps(vec![
            Step::Event(token("a")),
            Step::Event(GenerationEvent::Failed("device lost".into())),
        ])
    };
    let error = ApiError::internal("device lost");
    let (app, _) = node(failing());
    let (_, _, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    assert_eq!(
        body,
        format!("{}{}", sse::token_event("a"), sse::error_event(&error))
    );
    let (app, _) = node(failing());
    let (_, _, body) = send(app, chat(json!({"stream": true}))).await;
    let events = data_events(&body);
    assert!(
        events.last().unwrap()["error"]["message"].is_string(),
        "{body}"
    );
    assert!(!body.contains("[DONE]"), "{body}");
    // Dropped for stalling: a 408 in the stream's shape.
    let (app, _) = node(Script::steps(vec![
        Step::Event(token("a")),
        Step::Stalled("the client did not read".into()),
    ]));
    let (_, _, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    assert!(body.contains("3007"), "{body}");
    // And the JSON answer of a failed generation is a 500.
    let (app, _) = node(failing());
    let (status, _, body) = send(app, run(json!({"prompt": "hi"}))).await;
    assert_eq!(status, 500, "{body}");
}

#[tokio::test]
async fn a_stream_is_never_silent_longer_than_the_heartbeat() {
    let (app, _) = node(Script::steps(vec![
        Step::Event(token("a")),
        Step::Pause(Duration::from_millis(300)),
        Step::Event(token("b")),
        Step::Event(usage(5, 2)),
    ]));
    let (_, _, body) = send(app, run(json!({"prompt": "hi", "stream": true}))).await;
    let a = body.find(&sse::token_event("a")).unwrap();
    let b = body.find(&sse::token_event("b")).unwrap();
    let between = &body[a..b];
    assert!(
        between.matches(sse::heartbeat()).count() >= 2,
        "heartbeats while the engine is quiet: {body:?}"
    );
    assert!(body.ends_with(sse::DONE_EVENT));
    // OpenAI's stream: the same comments.
    let (app, _) = node(Script::steps(vec![
        Step::Event(token("a")),
        Step::Pause(Duration::from_millis(300)),
        Step::Event(usage(5, 1)),
    ]));
    let (_, _, body) = send(app, chat(json!({"stream": true}))).await;
    assert!(body.contains(sse::heartbeat()), "{body:?}");
}

#[tokio::test]
async fn a_client_that_hangs_up_cancels_its_generation() {
    let (app, fake) = node(Script::steps(vec![Step::Event(token("a")), Step::Hang]));
    let resp = app
        .oneshot(run(json!({"prompt": "hi", "stream": true})))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(first, sse::token_event("a"));
    // Still running: a heartbeat comes while the backend says nothing.
    let next = body.next().await.unwrap().unwrap();
    assert_eq!(next, sse::heartbeat());
    assert_eq!(fake.cancelled(), 0);
    drop(body);
    assert_eq!(fake.cancelled(), 1);
}

#[tokio::test]
async fn model_routes_list_the_served_names() {
    let (app, _) = node(Script::default());
    let (status, _, body) =
        send(app, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL),
        "{body}"
    );

    let (app, _) = node(Script::default());
    let (status, _, body) = send(
        app,
        Request::get(format!("/v1/models/{MODEL}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["id"], MODEL);

    let (app, _) = node(Script::default());
    let (status, _, body) = send(
        app,
        Request::get("/v1/models/nope").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let (app, _) = node(Script::default());
    let (status, _, body) = send(
        app,
        Request::get("/client/v4/accounts/abc/ai/models/search")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(MODEL), "{body}");
}

#[tokio::test]
async fn health_follows_the_backend() {
    let (app, fake) = node(Script::default());
    let get = || Request::get("/health").body(Body::empty()).unwrap();
    let (status, _, body) = send(app.clone(), get()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["status"], "ok");
    assert_eq!(json_of(&body)["context_window"], 4096);
    fake.set_health(Health::Failing("device lost".into()));
    let (status, _, body) = send(app, get()).await;
    assert_eq!(status, 503, "{body}");
}

fn node_with_cors(cors: &[&str]) -> Router {
    let fake = FakeBackend::new(Script::tokens(&["ok"]));
    let mut state = AppState::new(
        vec![MODEL.to_string()],
        TokenSet::new(vec!["secret".to_string()]),
    );
    state.cors = crate::http_layers::CorsOrigins::parse(
        &cors.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(state.set_backend(fake));
    router(state)
}

fn preflight(origin: &str) -> Request<Body> {
    Request::options(format!("/run/{MODEL}"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, x-stainless-os",
        )
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn cors_is_off_unless_origins_are_named_and_then_preflights_skip_auth() {
    const PAGE: &str = "https://app.example.com";
    // Off: no CORS headers, and a preflight is an ordinary request (401 without a token).
    let (status, headers, _) = send(node_with_cors(&[]), preflight(PAGE)).await;
    assert_eq!(status, 401);
    assert!(!headers.contains_key("access-control-allow-origin"));

    // On: the preflight is answered before the bearer check, for the methods and headers
    // the page asked for.
    let (status, headers, _) = send(node_with_cors(&[PAGE]), preflight(PAGE)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], PAGE);
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    assert!(headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("x-stainless-os"));
    assert!(!headers.contains_key("access-control-allow-credentials"));

    // The real request still needs the token, and its answer names the origin and exposes
    // the request id.
    let call = |token: Option<&str>| {
        let mut req = Request::post(format!("/run/{MODEL}"))
            .header("origin", PAGE)
            .header("content-type", "application/json");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        req.body(Body::from(json!({"prompt": "hi"}).to_string()))
            .unwrap()
    };
    let (status, headers, _) = send(node_with_cors(&[PAGE]), call(None)).await;
    assert_eq!(status, 401);
    assert_eq!(headers["access-control-allow-origin"], PAGE);
    let (status, headers, body) = send(node_with_cors(&[PAGE]), call(Some("secret"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["access-control-allow-origin"], PAGE);
    let exposed = headers["access-control-expose-headers"].to_str().unwrap();
    assert!(
        exposed.contains(edgerun_protocol::REQUEST_ID_HEADER) && exposed.contains("retry-after"),
        "{exposed}"
    );

    // Another page gets no grant; `*` grants every page.
    let (_, headers, _) = send(node_with_cors(&[PAGE]), preflight("https://evil.example")).await;
    assert!(!headers.contains_key("access-control-allow-origin"));
    let (status, headers, _) =
        send(node_with_cors(&["*"]), preflight("https://evil.example")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["access-control-allow-origin"], "*");
}

/// A node with two text-generation models, each a fake that answers with its own text.
fn two_models() -> (AppState, FakeBackend, FakeBackend) {
    let (a, b) = (
        FakeBackend::new(Script::tokens(&["from ", "a"])),
        FakeBackend::new(Script::tokens(&["from ", "b"])),
    );
    let mut state = AppState::new(Vec::new(), TokenSet::new(Vec::<String>::new()));
    state.generators = std::sync::Arc::new(vec![
        crate::GenerationSlot::new(vec![MODEL.into(), "a".into()], "model a".into()),
        crate::GenerationSlot::new(vec!["@cf/other/b".into()], "model b".into()),
    ]);
    assert!(state.generators[0]
        .backend
        .set(std::sync::Arc::new(a.clone()))
        .is_ok());
    (state, a, b)
}

#[tokio::test]
async fn each_model_name_reaches_its_own_engine_in_every_dialect() {
    let (state, a, b) = two_models();
    // The second model still loading: the node is not ready, its runs are 503, the first's
    // run.
    let get = || Request::get("/health").body(Body::empty()).unwrap();
    let (status, _, body) = send(router(state.clone()), get()).await;
    assert_eq!(
        (status, json_of(&body)["status"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!("loading")),
        "{body}"
    );
    let (status, _, body) = send(
        router(state.clone()),
        post("/run/@cf/other/b", json!({"prompt": "hi"})),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(state.generators[1]
        .backend
        .set(std::sync::Arc::new(b.clone()))
        .is_ok());
    let app = router(state.clone());

    let (status, headers, body) = send(app.clone(), run(json!({"prompt": "hi"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["result"]["response"], "from a");
    assert!(headers.contains_key(edgerun_protocol::LOAD_HEADER));
    let (_, _, body) = send(
        app.clone(),
        post("/run/@cf/other/b", json!({"prompt": "hi"})),
    )
    .await;
    assert_eq!(json_of(&body)["result"]["response"], "from b", "{body}");
    // An alias of the first model, and OpenAI's and the binding's routes to the second.
    let (_, _, body) = send(app.clone(), post("/run/a", json!({"prompt": "hi"}))).await;
    assert_eq!(json_of(&body)["result"]["response"], "from a", "{body}");
    let mut req = json!({"model": "@cf/other/b", "messages": [{"role": "user", "content": "hi"}]});
    let (_, _, body) = send(app.clone(), post("/v1/chat/completions", req.clone())).await;
    assert_eq!(
        json_of(&body)["choices"][0]["message"]["content"],
        "from b",
        "{body}"
    );
    req["model"] = json!("nope");
    let (status, _, body) = send(app.clone(), post("/v1/chat/completions", req)).await;
    assert_eq!(status, 404, "{body}");
    let bound = Request::post("/run?version=3")
        .header("content-type", "application/json")
        .header("cf-consn-model-id", "@cf/other/b")
        .body(Body::from(
            json!({"inputs": {"prompt": "hi"}, "options": {}}).to_string(),
        ))
        .unwrap();
    let (_, _, body) = send(app.clone(), bound).await;
    assert_eq!(json_of(&body)["response"], "from b", "{body}");
    assert_eq!((a.seen().len(), b.seen().len()), (2, 3));

    // Every name listed, each model's window and the node's figures in /health.
    let (_, _, body) = send(
        app.clone(),
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    let ids: Vec<Value> = json_of(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [json!(MODEL), json!("a"), json!("@cf/other/b")]);
    let (status, _, body) = send(app.clone(), get()).await;
    assert_eq!(status, 200, "{body}");
    let health = json_of(&body);
    assert_eq!(health["generation"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(health["generation"][1]["models"], json!(["@cf/other/b"]));
    assert_eq!(health["context_window"], 4096);

    // One model failing fails the node's health, naming it.
    b.set_health(Health::Failing("device lost".into()));
    let (status, _, body) = send(app, get()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        json_of(&body)["reason"],
        "@cf/other/b: device lost",
        "{body}"
    );
}
