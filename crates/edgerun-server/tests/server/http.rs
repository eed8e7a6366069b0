//! The HTTP layer without a model: routing, auth, limits, validation and error envelopes.
//! (Behaviour that needs the model is tested end to end in `tests/`.)

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use axum::Router;
use edgerun_server::{router, AppState, TokenSet};
use serde_json::Value;
use tower::ServiceExt;

const MODEL: &str = "@cf/meta/llama-3-8b-instruct";

fn app(tokens: &[&str]) -> Router {
    let mut state = AppState::new(
        vec![MODEL.to_string(), "tiny-model".to_string()],
        TokenSet::new(tokens.iter().map(|s| s.to_string())),
    );
    state.body.max_bytes = 1024;
    router(state)
}

async fn send(app: Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn post(uri: &str, token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(body.into()).unwrap()
}

fn code(body: &str) -> u64 {
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["success"], false, "{body}");
    v["errors"][0]["code"].as_u64().unwrap()
}

#[tokio::test]
async fn missing_or_wrong_token_is_401_with_code_10000() {
    for token in [None, Some("wrong"), Some("")] {
        let (status, headers, body) = send(
            app(&["secret"]),
            post(&format!("/run/{MODEL}"), token, "{}"),
        )
        .await;
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            body,
            r#"{"errors":[{"code":10000,"message":"Authentication error"}],"success":false,"result":null,"messages":[]}"#
        );
    }
    // Scheme is case-insensitive.
    let req = Request::post(format!("/run/{MODEL}"))
        .header("authorization", "bearer secret")
        .body(Body::from(r#"{"prompt":"hi"}"#))
        .unwrap();
    let (status, _, _) = send(app(&["secret"]), req).await;
    assert_eq!(
        status, 503,
        "authenticated request reaches the (still loading) engine"
    );
}

#[tokio::test]
async fn health_needs_no_token_and_is_503_while_loading() {
    let req = Request::get("/health").body(Body::empty()).unwrap();
    let (status, _, body) = send(app(&["secret"]), req).await;
    assert_eq!(status, 503);
    assert_eq!(body, r#"{"status":"loading"}"#);
}

#[tokio::test]
async fn both_route_forms_and_encoded_slashes_reach_the_engine() {
    for uri in [
        format!("/run/{MODEL}"),
        "/run/@cf%2Fmeta%2Fllama-3-8b-instruct".to_string(),
        format!("/client/v4/accounts/abc123/ai/run/{MODEL}"),
        "/client/v4/accounts/abc123/ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct".to_string(),
        "/run/tiny-model".to_string(),
    ] {
        let (status, headers, body) =
            send(app(&["t"]), post(&uri, Some("t"), r#"{"prompt":"hi"}"#)).await;
        assert_eq!(status, 503, "{uri}: {body}");
        assert_eq!(code(&body), 3040, "{uri}");
        assert_eq!(headers["retry-after"], "1");
    }
}

#[tokio::test]
async fn unknown_model_is_5007() {
    let (status, _, body) = send(
        app(&["t"]),
        post(
            "/run/@cf/meta/llama-2-7b-chat-int8",
            Some("t"),
            r#"{"prompt":"hi"}"#,
        ),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        r#"{"errors":[{"code":5007,"message":"No such model @cf/meta/llama-2-7b-chat-int8 or task"}],"success":false,"result":null,"messages":[]}"#
    );
}

#[tokio::test]
async fn bad_bodies_are_5006_naming_the_field() {
    let cases = [
        ("{not json", "not valid JSON"),
        (
            r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
            "mutually exclusive",
        ),
        (r#"{"prompt":"a","temperature":"hot"}"#, "/temperature"),
        (r#"{"prompt":"a","max_tokens":0}"#, "/max_tokens"),
        (r#"{"prompt":"a","seed":0}"#, "/seed"),
        (r#"{"messages":[{"role":"user"}]}"#, "/messages/0"),
        ("[1,2]", "'/'"),
    ];
    for (body, needle) in cases {
        let (status, headers, resp) =
            send(app(&["t"]), post(&format!("/run/{MODEL}"), Some("t"), body)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(code(&resp), 5006, "{body}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.starts_with("AiError: Bad input: "), "{msg}");
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
        assert_eq!(v["result"], serde_json::json!({}));
    }
}

#[tokio::test]
async fn oversized_body_is_413() {
    let body = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2000));
    let (status, _, resp) =
        send(app(&["t"]), post(&format!("/run/{MODEL}"), Some("t"), body)).await;
    assert_eq!(status, 413);
    assert_eq!(code(&resp), 3006);
}

#[tokio::test]
async fn json_mode_without_its_schema_is_refused_clearly() {
    let body = r#"{"prompt":"a","response_format":{"type":"json_schema"}}"#;
    let (status, _, resp) =
        send(app(&["t"]), post(&format!("/run/{MODEL}"), Some("t"), body)).await;
    assert_eq!(status, 400);
    assert!(resp.contains("response_format"), "{resp}");
}

#[tokio::test]
async fn wrong_method_and_unknown_route() {
    let req = Request::get(format!("/run/{MODEL}"))
        .header("authorization", "Bearer t")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(app(&["t"]), req).await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
    assert_eq!(code(&body), 7001);
    let (status, _, body) = send(app(&["t"]), post("/v2/chat/nope", Some("t"), "{}")).await;
    assert_eq!(status, 400);
    assert_eq!(code(&body), 7000);
    // Under /v1/ no route is said in OpenAI's shape.
    let (status, _, body) = send(app(&["t"]), post("/v1/chat/nope", Some("t"), "{}")).await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["message"], "No route for that URI", "{body}");
    // An empty account segment is no route, as the shared rule (and the Worker) says.
    let path = format!("/client/v4/accounts//ai/run/{MODEL}");
    let (status, _, body) = send(app(&["t"]), post(&path, Some("t"), "{}")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(code(&body), 7000, "{body}");
    // The open routes answer a wrong method in the envelope too, not with a bare 405.
    for path in ["/health", "/metrics"] {
        let (status, headers, body) = send(app(&["t"]), post(path, None, "")).await;
        assert_eq!(status, 405, "{path}");
        assert_eq!(headers["content-type"], "application/json", "{path}");
        assert_eq!(headers["allow"], "GET, HEAD", "{path}");
        assert_eq!(code(&body), 7001, "{path}");
    }
}

#[tokio::test]
async fn request_id_is_kept_or_made() {
    let req = Request::get("/health")
        .header("cf-ai-req-id", "abc-123")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = send(app(&[]), req).await;
    assert_eq!(headers["cf-ai-req-id"], "abc-123");
    let req = Request::get("/health").body(Body::empty()).unwrap();
    let (_, headers, _) = send(app(&[]), req).await;
    assert_eq!(headers["cf-ai-req-id"].len(), 36);
}

#[tokio::test]
async fn without_tokens_configured_requests_are_not_authenticated() {
    let (status, _, _) = send(
        app(&[]),
        post(&format!("/run/{MODEL}"), None, r#"{"prompt":"hi"}"#),
    )
    .await;
    assert_eq!(status, 503);
}

fn openai_error(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    assert!(v.get("errors").is_none(), "{body}");
    v["error"].clone()
}

#[tokio::test]
async fn openai_routes_answer_errors_in_their_familys_shape() {
    let chat = r#"{"model":"tiny-model","messages":[{"role":"user","content":"hi"}]}"#;
    // Auth first, on every OpenAI route.
    for (method, path) in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (status, headers, body) = send(app(&["t"]), req).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(headers["content-type"], "application/json");
        let e = openai_error(&body);
        assert_eq!(e["type"], "authentication_error", "{body}");
        assert_eq!(e["code"], "invalid_api_key", "{body}");
    }
    let cf = "/client/v4/accounts/a/ai/v1/chat/completions";
    let (status, _, body) = send(app(&["t"]), post(cf, Some("x"), chat)).await;
    assert_eq!((status.as_u16(), code(&body)), (401, 10000));

    // The model is checked against the served names: 404 on /v1, 400 / 5007 on Workers AI's.
    let unknown = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, body) = send(
        app(&["t"]),
        post("/v1/chat/completions", Some("t"), unknown),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(openai_error(&body)["code"], "model_not_found");
    let (status, _, body) = send(app(&["t"]), post(cf, Some("t"), unknown)).await;
    assert_eq!((status.as_u16(), code(&body)), (400, 5007));

    // A served model while the engine is still loading: 503, not started, Retry-After.
    let (status, headers, body) =
        send(app(&["t"]), post("/v1/chat/completions", Some("t"), chat)).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["edgerun-not-started"], "1");
    assert_eq!(openai_error(&body)["type"], "service_unavailable_error");
    let (status, _, body) = send(app(&["t"]), post(cf, Some("t"), chat)).await;
    assert_eq!((status.as_u16(), code(&body)), (503, 3040));

    // Bad bodies: OpenAI's 400.
    let (status, _, body) = send(
        app(&["t"]),
        post("/v1/completions", Some("t"), r#"{"model":"tiny-model"}"#),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(openai_error(&body)["message"], "'prompt' is required");
    let big = format!(
        r#"{{"model":"tiny-model","prompt":"{}"}}"#,
        "x".repeat(2000)
    );
    let (status, _, body) = send(app(&["t"]), post("/v1/completions", Some("t"), big)).await;
    assert_eq!(status, 413);
    assert_eq!(openai_error(&body)["type"], "invalid_request_error");

    // The model list needs no engine.
    let req = Request::get("/v1/models")
        .header("authorization", "Bearer t")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(app(&["t"]), req).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][1]["id"], "tiny-model", "{body}");

    // An empty account segment is no route, as the shared rule says.
    let path = "/client/v4/accounts//ai/v1/chat/completions";
    let (status, _, body) = send(app(&["t"]), post(path, Some("t"), chat)).await;
    assert_eq!((status.as_u16(), code(&body)), (400, 7000), "{body}");
}

fn binding_run(token: Option<&str>, query: &str, model: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(format!("/run{query}"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(m) = model {
        b = b.header("cf-consn-model-id", m);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

#[tokio::test]
async fn binding_run_answers_errors_the_runtime_can_throw() {
    let inputs = r#"{"inputs":{"prompt":"hi"},"options":{"rejectIfBusy":true}}"#;
    for (req, status, code) in [
        (
            binding_run(None, "?version=3", Some(MODEL), inputs),
            401,
            10000,
        ),
        (
            binding_run(Some("t"), "?version=2", Some(MODEL), inputs),
            400,
            7000,
        ),
        (
            binding_run(Some("t"), "?version=3", None, inputs),
            400,
            3003,
        ),
        (
            binding_run(Some("t"), "?version=3", Some("nope"), inputs),
            400,
            5007,
        ),
        (
            binding_run(Some("t"), "?version=3", Some(MODEL), r#"{"inputs":{}}"#),
            400,
            5006,
        ),
        (
            binding_run(Some("t"), "?version=3", Some(MODEL), &"x".repeat(2000)),
            413,
            3006,
        ),
        // Valid: it reaches the (still loading) engine.
        (
            binding_run(Some("t"), "?version=3", Some(MODEL), inputs),
            503,
            3040,
        ),
    ] {
        let (got, headers, body) = send(app(&["t"]), req).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["internalCode"], code, "{body}");
        assert_eq!(v["errors"][0]["code"], code, "{body}");
        assert!(
            v["name"].is_string() && v["description"].is_string(),
            "{body}"
        );
    }
    let (status, headers, _) = send(
        app(&["t"]),
        Request::get("/run?version=3")
            .header("authorization", "Bearer t")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(headers["allow"], "POST");
}

#[tokio::test]
async fn the_catalogue_answers_while_the_model_loads() {
    let get = |uri: &str, token: Option<&str>| {
        let mut b = Request::get(uri);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    };
    for uri in [
        "/client/v4/accounts/a/ai/models/search",
        "/ai-api/models/search",
    ] {
        let (status, _, body) = send(app(&["t"]), get(uri, Some("t"))).await;
        assert_eq!(status, 200, "{uri}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = v["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [MODEL, "tiny-model"]);
        // No context window until the model has loaded and says what it is.
        assert_eq!(
            v["result"][0]["properties"][0]["property_id"], "info",
            "{body}"
        );
        let (status, _, _) = send(app(&["t"]), get(uri, None)).await;
        assert_eq!(status, 401);
    }
    let (status, _, body) = send(
        app(&["t"]),
        get(
            "/client/v4/accounts/a/ai/models/schema?model=tiny-model",
            Some("t"),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["result"]["input"]["oneOf"].is_array(), "{body}");
    let (status, _, body) = send(app(&["t"]), get("/v1/models/tiny-model", Some("t"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send(app(&["t"]), get("/v1/models/other", Some("t"))).await;
    assert_eq!(status, 404);
    assert_eq!(openai_error(&body)["code"], "model_not_found");
}
