//! Engine faults as clients and operators see them, on the real model with faults injected
//! (the engine's `fault-injection` feature, enabled for these tests only): a failing sequence
//! gets an error event while a concurrent stream finishes, and a device that keeps failing turns
//! `/health` to 503 and shows in `/metrics` until a step succeeds again.

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use edgerun_engine::faults::Faults;
use edgerun_engine::{Engine, LoadedModel, SchedulerConfig};
use edgerun_server::{router, AppState, TokenSet};
use edgerun_testkit::model_path;
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL: &str = "@cf/meta/llama-3-8b-instruct";

fn node() -> (AppState, Engine) {
    let device = edgerun_engine::DeviceSpec::Cpu.open().unwrap();
    let loaded = LoadedModel::load(&model_path(), None, &device).unwrap();
    let engine = Engine::start(loaded, SchedulerConfig::default(), None).unwrap();
    let mut state = AppState::new(vec![MODEL.to_string()], TokenSet::new(Vec::<String>::new()));
    state.metrics = edgerun_server::telemetry::install();
    assert!(state.set_backend(engine.clone()));
    (state, engine)
}

async fn call(state: &AppState, req: Request<Body>) -> (StatusCode, String) {
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn run(body: Value) -> Request<Body> {
    Request::post(format!("/run/{MODEL}"))
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_fail_only_their_sequences_and_a_failing_device_turns_health_503() {
    let (state, engine) = tokio::task::spawn_blocking(node).await.unwrap();

    // A poisoned stream fails with an error event; a concurrent stream is untouched.
    let poison = engine
        .tokenizer()
        .encode(" quetzal")
        .unwrap()
        .into_iter()
        .last()
        .unwrap();
    engine.inject_faults(Faults {
        error_on_token: Some(poison),
        ..Faults::default()
    });
    let good = call(
        &state,
        run(json!({"prompt": "Say hi.", "max_tokens": 12, "stream": true, "temperature": 0})),
    );
    let bad = call(
        &state,
        run(json!({"prompt": "Describe a quetzal.", "max_tokens": 12, "stream": true})),
    );
    let ((good_status, good_body), (bad_status, bad_body)) = tokio::join!(good, bad);
    assert_eq!(good_status, 200);
    assert!(good_body.ends_with("data: [DONE]\n\n"), "{good_body}");
    // The failure may come before the headers (an envelope) or after (an error event).
    if bad_status == 200 {
        assert!(!bad_body.contains("[DONE]"), "{bad_body}");
        assert!(bad_body.contains("error"), "{bad_body}");
    } else {
        assert_eq!(bad_status, 500, "{bad_body}");
    }
    let (status, _) = call(&state, get("/health")).await;
    assert_eq!(status, 200, "one bad sequence is not a failing device");

    // A device that fails every step.
    engine.inject_faults(Faults {
        fail_every_step: true,
        ..Faults::default()
    });
    for _ in 0..edgerun_engine::FAILING_AFTER {
        let (status, body) = call(&state, run(json!({"prompt": "Say hi.", "max_tokens": 4}))).await;
        assert_eq!(status, 500, "{body}");
    }
    let (status, body) = call(&state, get("/health")).await;
    assert_eq!(status, 503, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "failing", "{body}");
    assert!(
        health["reason"].as_str().unwrap().contains("injected"),
        "{body}"
    );
    let (_, text) = call(&state, get("/metrics")).await;
    assert_eq!(metric(&text, "edgerun_healthy"), 0.0);
    assert_eq!(
        metric(&text, "edgerun_device_failures_total"),
        edgerun_engine::FAILING_AFTER as f64
    );
    assert!(metric(&text, "edgerun_sequences_failed_total") >= 4.0);

    // It recovers with the first step that succeeds.
    engine.inject_faults(Faults::default());
    let (status, body) = call(&state, run(json!({"prompt": "Say hi.", "max_tokens": 4}))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(&state, get("/health")).await;
    assert_eq!(status, 200);
    let (_, text) = call(&state, get("/metrics")).await;
    assert_eq!(metric(&text, "edgerun_healthy"), 1.0);
    let stats = engine.stats();
    assert_eq!((stats.active_sequences, stats.queued_requests), (0, 0));
}
