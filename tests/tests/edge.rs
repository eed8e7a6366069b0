//! End to end through the edge: clients → the Worker (wasm, in workerd) → an Access stand-in per
//! region → two real edgerun nodes on the real model, all on loopback.

use edgerun_e2e::edge::{
    chunks_with_times, AccessGate, Behaviour, EdgeWorker, FakeOrigin, ACCESS_CLIENT_ID,
    ACCESS_CLIENT_SECRET, CF_BLOB_HEADER,
};
use edgerun_e2e::{read_sse, run_sdk_script, sdk_var, text_of, Node, MODEL_ALIAS, TOKEN};
use edgerun_protocol::sse::SseEvent;
use edgerun_protocol::ApiError;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const CALLER_TOKEN: &str = "caller-token-2";

/// One region: its Access stand-in and its node (`None` once stopped).
struct Region {
    gate: AccessGate,
    node: Option<Node>,
}

impl Region {
    async fn start(extra: &[&str]) -> Region {
        let (gate, node) = AccessGate::with_node(extra).await;
        Region {
            gate,
            node: Some(node),
        }
    }

    /// A request to the node through its gate with everything the Worker adds.
    fn direct(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.gate.base))
            .header("cf-access-client-id", ACCESS_CLIENT_ID)
            .header("cf-access-client-secret", ACCESS_CLIENT_SECRET)
            .bearer_auth(TOKEN)
    }
}

/// Two regions, `eu` (the default) and `us`, behind one Worker.
struct Deployment {
    worker: EdgeWorker,
    eu: Region,
    us: Region,
    client: reqwest::Client,
}

impl Deployment {
    async fn start() -> Deployment {
        Self::start_with(&[]).await
    }

    /// With extra `edgerun serve` flags for the eu node.
    async fn start_with(eu_flags: &[&str]) -> Deployment {
        let (eu, us) = tokio::join!(Region::start(eu_flags), Region::start(&[]));
        let worker = worker_for(&eu, &us, &[]).await;
        Deployment {
            worker,
            eu,
            us,
            client: reqwest::Client::new(),
        }
    }

    /// A run request to the Worker from a caller on `continent`.
    fn run(&self, continent: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.worker.url(&format!("/run/{MODEL_ALIAS}")))
            .bearer_auth(CALLER_TOKEN)
            .header(CF_BLOB_HEADER, json!({"continent": continent}).to_string())
            .body(body.to_string())
    }

    fn forwarded(&self) -> usize {
        self.eu.gate.forwarded() + self.us.gate.forwarded()
    }
}

/// The Worker in front of `eu` and `us`, with every secret set except those in `without`.
async fn worker_for(eu: &Region, us: &Region, without: &[&str]) -> EdgeWorker {
    worker_for_origins(&eu.gate.base, &us.gate.base, without).await
}

/// The Worker in front of the regions `eu` (the default) and `us` at these origins.
async fn worker_for_origins(eu: &str, us: &str, without: &[&str]) -> EdgeWorker {
    let nodes = json!({
        "default": "eu",
        "regions": [
            {"name": "eu", "origin": eu, "continents": ["EU", "AF"]},
            {"name": "us", "origin": us, "continents": ["NA", "SA"]},
        ]
    });
    let secrets: Vec<(&str, String)> = [
        ("API_TOKENS", format!("caller-token-1, {CALLER_TOKEN}")),
        ("NODE_TOKEN", TOKEN.to_string()),
        ("ACCESS_CLIENT_ID", ACCESS_CLIENT_ID.to_string()),
        ("ACCESS_CLIENT_SECRET", ACCESS_CLIENT_SECRET.to_string()),
    ]
    .into_iter()
    .filter(|(name, _)| !without.contains(name))
    .collect();
    // NODES as a JSON binding, as a `[vars.NODES]` table in wrangler.toml gives it.
    EdgeWorker::start(&secrets, &[("NODES", nodes.to_string())]).await
}

fn greedy(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_through_the_worker_from_the_callers_region() {
    let d = Deployment::start().await;
    let poem = json!({"messages":[{"role":"user","content":"Write a short poem about rivers."}],
                      "stream": true, "max_tokens": 48, "temperature": 0});

    // Streaming, from Europe: the eu node answers, event by event.
    let start = Instant::now();
    let resp = d
        .run("EU", &poem)
        .header("cf-ai-req-id", "caller-chosen-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    assert_eq!(header(&resp, "cf-ai-req-id"), "caller-chosen-id-1");
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "Access's CF_Authorization cookie must not reach the caller"
    );
    assert_eq!(
        d.eu.gate.last_request_id().as_deref(),
        Some("caller-chosen-id-1"),
        "the node gets the caller's request id"
    );
    let events = read_sse(resp, start).await;
    let n = events.len();
    assert!(matches!(events[n - 1].event, SseEvent::Done), "{events:?}");
    let tokens = &events[..n - 2];
    assert!(tokens.len() >= 10, "{events:?}");
    let (first, last) = (tokens[0].at, tokens[tokens.len() - 1].at);
    assert!(
        last > first + Duration::from_millis(100),
        "the first event ({first:?}) must reach the caller well before the last ({last:?})"
    );
    let via_eu = text_of(&events);

    // The same request from North America goes to the us node, over the REST route, and
    // arrives in many chunks (the Worker does not buffer or re-chunk).
    let start = Instant::now();
    let resp = d
        .client
        .post(
            d.worker
                .url("/client/v4/accounts/acc123/ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct"),
        )
        .bearer_auth(CALLER_TOKEN)
        .header(
            CF_BLOB_HEADER,
            json!({"continent": "NA", "colo": "IAD"}).to_string(),
        )
        .body(poem.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "us");
    let id = header(&resp, "cf-ai-req-id").to_string();
    assert_eq!(
        id.len(),
        36,
        "a fresh UUID when the caller sent no id: {id:?}"
    );
    assert_eq!(d.us.gate.last_request_id(), Some(id.clone()));
    let chunks = chunks_with_times(resp, start).await;
    assert!(chunks.len() >= 10, "streamed in {} chunks", chunks.len());

    // Greedy text is the same whichever region answered, and the same as the node's own answer.
    let france = greedy("The capital of France is", 12, false);
    let via_worker = json_of(d.run("EU", &france)).await;
    let direct = json_of(
        d.us.direct(reqwest::Method::POST, &format!("/run/{MODEL_ALIAS}"))
            .body(france.to_string()),
    )
    .await;
    assert_eq!(via_worker["success"], true, "{via_worker}");
    assert_eq!(via_worker, direct);
    assert!(!via_eu.is_empty());

    // /health passes through too, query string and all (from the default region; with the
    // Access service token but not the node's token, which it does not need).
    let resp = d
        .client
        .get(d.worker.url("/health?probe=edge&x=%2F"))
        .bearer_auth(CALLER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    assert!(resp.headers().get("set-cookie").is_none());
    let health: Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(
        d.eu.gate.last_uri().as_deref(),
        Some("/health?probe=edge&x=%2F")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_need_the_workers_token_and_nodes_need_the_workers_headers() {
    let d = Deployment::start().await;
    let body = greedy("Hello", 4, false);
    let before = d.forwarded();
    let unauthorized = ApiError::authentication().to_json();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("caller-token-1"),
        Some(&*format!("Bearer {TOKEN}")),
    ] {
        let mut req = d
            .client
            .post(d.worker.url(&format!("/run/{MODEL_ALIAS}")))
            .body(body.to_string());
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(header(&resp, "content-type"), "application/json");
        assert!(!header(&resp, "cf-ai-req-id").is_empty());
        assert_eq!(resp.text().await.unwrap(), unauthorized, "{auth:?}");
    }
    let resp = d.client.get(d.worker.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "pass-through routes need the token too");
    assert_eq!(
        d.forwarded(),
        before,
        "no unauthenticated request reached a region"
    );

    // The other token in API_TOKENS works.
    let resp = d
        .client
        .post(d.worker.url(&format!("/run/{MODEL_ALIAS}")))
        .bearer_auth("caller-token-1")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A node refuses what lacks the Worker's headers. Without the Access service token the
    // request never passes Access; with it but without the node's token, the node says 401;
    // around Access (no JWT), the node says 403.
    let run_path = format!("/run/{MODEL_ALIAS}");
    let resp = reqwest::Client::new()
        .post(format!("{}{run_path}", d.eu.gate.base))
        .bearer_auth(TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "Access without the service token");
    let resp = reqwest::Client::new()
        .post(format!("{}{run_path}", d.eu.gate.base))
        .header("cf-access-client-id", ACCESS_CLIENT_ID)
        .header("cf-access-client-secret", ACCESS_CLIENT_SECRET)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.text().await.unwrap(), unauthorized);
    let node = d.eu.node.as_ref().unwrap();
    let resp = node.post(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 403, "the node itself without an Access JWT");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["errors"][0]["code"], 10000, "{err}");
    // ... and with everything, it answers.
    let resp =
        d.eu.direct(reqwest::Method::POST, &run_path)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        header(&resp, "set-cookie").starts_with("CF_Authorization="),
        "the Access stand-in sets its cookie (which the Worker must strip)"
    );

    // A Worker missing a node credential says so (500 naming the secret) instead of passing the
    // node's 401 off as the caller's fault; unauthenticated callers still only get 401.
    let broken = worker_for(&d.eu, &d.us, &["NODE_TOKEN"]).await;
    let before = d.forwarded();
    let resp = d
        .client
        .post(broken.url(&run_path))
        .bearer_auth(CALLER_TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(
        err["errors"][0]["message"],
        "AiError: Internal error: the Worker is misconfigured: the secret NODE_TOKEN is not set"
    );
    let resp = d
        .client
        .post(broken.url(&run_path))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(d.forwarded(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_the_nodes_answer_from_the_worker_without_reaching_a_node() {
    let d = Deployment::start().await;
    let too_large = json!({"prompt": "x".repeat((1 << 20) + 1)}).to_string();
    let bodies: Vec<String> = vec![
        "not json".into(),
        "".into(),
        r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#.into(),
        r#"{"prompt":"hi","temperature":7}"#.into(),
        r#"{"prompt":"hi","max_tokens":0}"#.into(),
        r#"{"prompt":"hi","top_k":"many"}"#.into(),
        r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(),
        r#"{"prompt":"hi","lora":"x"}"#.into(),
        "{}".into(),
        too_large,
    ];
    let run_path = format!("/run/{MODEL_ALIAS}");
    let worker_post = || {
        d.client
            .post(d.worker.url(&run_path))
            .bearer_auth(CALLER_TOKEN)
    };
    for body in &bodies {
        let status = edge_answers_like_the_node(
            &d,
            d.eu.direct(reqwest::Method::POST, &run_path)
                .body(body.clone()),
            worker_post().body(body.clone()),
            &format!("{body:.80}"),
        )
        .await;
        assert!(status.is_client_error(), "{status} for {body:.80}");
    }
    // An oversized body sent without content-length (chunked) is refused as it streams in.
    let chunked = || {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..17)
            .map(|i| {
                Ok(if i == 0 {
                    b"{\"prompt\":\"".to_vec()
                } else {
                    vec![b'y'; 64 * 1024]
                })
            })
            .collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    };
    let status = edge_answers_like_the_node(
        &d,
        d.eu.direct(reqwest::Method::POST, &run_path)
            .body(chunked()),
        worker_post().body(chunked()),
        "a chunked body over the limit",
    )
    .await;
    assert_eq!(status, 413);
    // The wrong method on a run route, too.
    let status = edge_answers_like_the_node(
        &d,
        d.eu.direct(reqwest::Method::GET, &run_path),
        d.client
            .get(d.worker.url(&run_path))
            .bearer_auth(CALLER_TOKEN),
        "GET on a run route",
    )
    .await;
    assert_eq!(status, 405);
    // Paths the node has no route for, and wrong methods, in each route family's error shape.
    for (method, path) in [
        (reqwest::Method::POST, "/v2/chat/completions"),
        (reqwest::Method::GET, "/nothing/here"),
        (reqwest::Method::POST, "/health"),
        (reqwest::Method::POST, "/v1/embeddings"),
        (reqwest::Method::GET, "/v1/chat/completions"),
        (reqwest::Method::POST, "/v1/models"),
        (reqwest::Method::GET, "/run?version=3"),
        (reqwest::Method::GET, "/ai-api/nothing"),
        (
            reqwest::Method::DELETE,
            "/client/v4/accounts/acc/ai/models/search",
        ),
    ] {
        edge_answers_like_the_node(
            &d,
            d.eu.direct(method.clone(), path),
            d.client
                .request(method.clone(), d.worker.url(path))
                .bearer_auth(CALLER_TOKEN),
            &format!("{method} {path}"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_openai_and_binding_requests_get_the_nodes_answer_from_the_worker() {
    let d = Deployment::start().await;
    let chat = |extra: Value| {
        let mut body =
            json!({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    // OpenAI bodies: OpenAI's shape under /v1, the envelope on Workers AI's route.
    for path in [
        "/v1/chat/completions",
        "/client/v4/accounts/acc/ai/v1/chat/completions",
    ] {
        for body in [
            chat(json!({"n": 2})),
            chat(json!({"temperature": 3})),
            chat(json!({"messages": []})),
            "not json".to_string(),
        ] {
            let status = edge_answers_like_the_node(
                &d,
                d.eu.direct(reqwest::Method::POST, path).body(body.clone()),
                d.client
                    .post(d.worker.url(path))
                    .bearer_auth(CALLER_TOKEN)
                    .body(body.clone()),
                &format!("{path} {body}"),
            )
            .await;
            assert_eq!(status, 400);
        }
    }
    let completion = json!({"model": MODEL_ALIAS, "prompt": "x", "echo": true}).to_string();
    edge_answers_like_the_node(
        &d,
        d.eu.direct(reqwest::Method::POST, "/v1/completions")
            .body(completion.clone()),
        d.client
            .post(d.worker.url("/v1/completions"))
            .bearer_auth(CALLER_TOKEN)
            .body(completion),
        "completions with echo",
    )
    .await;
    // The binding's run: version, model header, body, each in the binding's error shape.
    let body = |inputs: Value| json!({"inputs": inputs, "options": {}}).to_string();
    for (query, model, body) in [
        (
            "?version=2",
            Some(MODEL_ALIAS),
            body(json!({"prompt": "hi"})),
        ),
        ("?version=3", None, body(json!({"prompt": "hi"}))),
        ("?version=3", Some(MODEL_ALIAS), body(json!({"prompt": ""}))),
        (
            "?version=3",
            Some(MODEL_ALIAS),
            json!({"prompt": "hi"}).to_string(),
        ),
        (
            "?version=3",
            Some(MODEL_ALIAS),
            body(json!({"prompt": "hi", "lora": "x"})),
        ),
    ] {
        let path = format!("/run{query}");
        let with_model = |req: reqwest::RequestBuilder| match model {
            Some(m) => req.header("cf-consn-model-id", m),
            None => req,
        };
        let status = edge_answers_like_the_node(
            &d,
            with_model(d.eu.direct(reqwest::Method::POST, &path).body(body.clone())),
            with_model(
                d.client
                    .post(d.worker.url(&path))
                    .bearer_auth(CALLER_TOKEN)
                    .body(body.clone()),
            ),
            &format!("binding {path} {model:?} {body}"),
        )
        .await;
        assert!(status == 400 || status == 405, "{status}");
    }
    // A wrong token on each family: 401 in its shape, from the Worker.
    for (path, shape) in [
        ("/v1/chat/completions", "error"),
        ("/run?version=3", "internalCode"),
        ("/client/v4/accounts/acc/ai/models/search", "errors"),
    ] {
        let resp = d
            .client
            .post(d.worker.url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert!(v.get(shape).is_some(), "{path}: {v}");
    }
}

/// Runs `tests/sdk/client.py` (the official `openai` Python SDK: chat whole and streamed,
/// logprobs, stop strings, completions, the model list, typed errors) against `base_url`.
async fn run_openai_sdk(base_url: &str, family: &str) {
    let env = [
        ("EDGERUN_BASE_URL", base_url.to_string()),
        ("EDGERUN_API_KEY", CALLER_TOKEN.to_string()),
        ("EDGERUN_MODEL", MODEL_ALIAS.to_string()),
        ("EDGERUN_FAMILY", family.to_string()),
    ];
    run_sdk_script(&sdk_var("EDGERUN_SDK_PYTHON"), "client.py", &env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_binding_and_catalogue_go_through_the_worker() {
    let d = Deployment::start().await;

    // The official OpenAI SDK, through both of the Worker's OpenAI base URLs.
    let before = d.eu.gate.forwarded();
    run_openai_sdk(&d.worker.url("/v1"), "v1").await;
    run_openai_sdk(
        &d.worker.url("/client/v4/accounts/acct123/ai/v1"),
        "workers-ai",
    )
    .await;
    assert!(
        d.eu.gate.forwarded() >= before + 8,
        "the SDK's calls reached the default region's node"
    );

    // A Worker written for Workers AI, its AI binding pointed at the edgerun Worker.
    let modules = PathBuf::from(sdk_var("EDGERUN_SDK_CF_AI"));
    let client =
        EdgeWorker::binding_client(&d.worker.base, CALLER_TOKEN, MODEL_ALIAS, &modules).await;
    let body = json!({"messages": [{"role": "user", "content": "Name three fruits."}],
                      "max_tokens": 24, "temperature": 0});
    let direct: Value =
        d.eu.direct(reqwest::Method::POST, &format!("/run/{MODEL_ALIAS}"))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    for path in ["/run", "/legacy"] {
        let got: Value = d
            .client
            .post(client.url(path))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got["out"], direct["result"], "{path}: {got}");
    }
    let start = Instant::now();
    let resp = d
        .client
        .post(client.url("/stream"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_sse(resp, start).await;
    assert!(matches!(events.last().unwrap().event, SseEvent::Done));
    assert_eq!(text_of(&events), direct["result"]["response"]);
    let models: Value = reqwest::get(client.url("/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models.as_array().map(Vec::len), Some(2), "{models}");
    let (_, v) = {
        let resp = d
            .client
            .post(client.url("/run?model=@cf/meta/nope"))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(
        v["thrown"]["message"],
        "5007: No such model @cf/meta/nope or task"
    );

    // The catalogue: what the node lists, through the Worker, query and all.
    for path in [
        "/client/v4/accounts/acc/ai/models/search?per_page=1&page=2",
        "/client/v4/accounts/acc/ai/models/schema?model=%40cf%2Fmeta%2Fllama-3-8b-instruct",
        "/v1/models",
        "/v1/models/@cf%2Fmeta%2Fllama-3-8b-instruct",
        "/ai-api/models/search?search=llama",
    ] {
        let via_worker = d
            .client
            .get(d.worker.url(path))
            .bearer_auth(CALLER_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(via_worker.status(), 200, "{path}");
        assert_eq!(header(&via_worker, "x-edgerun-region"), "eu");
        let via_worker: Value = via_worker.json().await.unwrap();
        let direct: Value =
            d.eu.direct(reqwest::Method::GET, path)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        assert_eq!(via_worker, direct, "{path}");
    }
}

/// Sends `direct` to a node (through its Access stand-in) and `edge` to the Worker: the Worker
/// must answer exactly as the node did — status, content type, body bytes — without passing the
/// request to any region. Returns the status.
async fn edge_answers_like_the_node(
    d: &Deployment,
    direct: reqwest::RequestBuilder,
    edge: reqwest::RequestBuilder,
    what: &str,
) -> reqwest::StatusCode {
    let node = direct.send().await.unwrap();
    let node_allow = header(&node, "allow").to_string();
    let (node_status, node_body) = (node.status(), node.text().await.unwrap());
    let before = d.forwarded();
    let edge = edge.send().await.unwrap();
    assert_eq!(
        d.forwarded(),
        before,
        "the Worker asked a node about {what}"
    );
    assert!(edge.headers().get("x-edgerun-region").is_none(), "{what}");
    assert_eq!(edge.status(), node_status, "{what}");
    assert_eq!(header(&edge, "content-type"), "application/json", "{what}");
    if node_status == 405 {
        // The Worker's 405s always name the route's methods (RFC 9110 asks every 405 to); the
        // node's, where it does.
        let allow = header(&edge, "allow");
        assert!(!allow.is_empty(), "{what}: a 405 without Allow");
        assert!(
            node_allow.is_empty() || node_allow == allow,
            "{what}: {allow:?}"
        );
    }
    assert_eq!(edge.text().await.unwrap(), node_body, "{what}");
    node_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_nodes_fail_over_and_failures_that_may_have_started_do_not() {
    // The eu node serves one sequence at a time, so it can be made busy.
    let mut d = Deployment::start_with(&["--max-batch", "1", "--max-queue", "0"]).await;
    let body = greedy("Once upon a time", 8, false);
    let ok = |resp: &reqwest::Response| {
        (
            resp.status().as_u16(),
            header(resp, "x-edgerun-region").to_string(),
        )
    };

    let resp = d.run("EU", &body).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "eu".into()));

    // Busy: while a long stream holds eu's only slot, eu answers 429/3040 and the Worker moves on.
    let counting = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": true, "stream": true,
                          "max_tokens": 2000, "temperature": 0});
    let long = d.run("EU", &counting).send().await.unwrap();
    assert_eq!(ok(&long), (200, "eu".into()));
    let eu_node = d.eu.node.as_ref().unwrap();
    eu_node
        .wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    let busy = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                      "options": {"rejectIfBusy": true}});
    let direct =
        d.eu.direct(reqwest::Method::POST, &format!("/run/{MODEL_ALIAS}"))
            .body(busy.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(direct.status(), 429, "the eu node itself is busy");
    let resp = d.run("EU", &busy).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));
    // The caller hanging up ends the generation on the node (through the Worker and Access):
    // 2000 tokens would take ~20 s; the slot must be free within a few.
    let hung_up = Instant::now();
    drop(long);
    eu_node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(5))
        .await;
    eprintln!(
        "eu freed its sequence {:?} after the caller hung up",
        hung_up.elapsed()
    );

    // The eu node stops: its Access stand-in answers 502, as Cloudflare does when cloudflared
    // cannot complete a request to the node. A node that dies mid-generation looks the same, so
    // the Worker does not send the request to us (it could run twice): the caller gets a 502 in
    // the envelope, streaming or not.
    d.eu.node = None;
    for stream in [false, true] {
        let before = (d.eu.gate.forwarded(), d.us.gate.forwarded());
        let resp = d
            .run("EU", &greedy("Once upon a time", 8, stream))
            .send()
            .await
            .unwrap();
        assert_bad_gateway(resp, "eu", "region eu answered 502").await;
        assert_eq!(
            (d.eu.gate.forwarded(), d.us.gate.forwarded()),
            (before.0 + 1, before.1),
            "stream: {stream}"
        );
    }
    // Callers of the us region are served as ever.
    let resp = d.run("NA", &body).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));

    // The whole eu region goes away (connection refused). workerd reports a refused connection
    // with the same text as one lost after the request was sent, so the Worker cannot tell that
    // the request never left and does not retry it (on Cloudflare, a region that cannot be
    // reached answers 521-523 or 530, which are retried: see the next test).
    d.eu.gate.stop().await;
    let before = d.us.gate.forwarded();
    let resp = d.run("EU", &body).send().await.unwrap();
    assert_bad_gateway(resp, "eu", "connection to region eu was lost").await;
    assert_eq!(d.us.gate.forwarded(), before);
    let line = d
        .worker
        .wait_for_output("node eu failed, not retried: Lost(")
        .await;
    assert!(line.contains(&format!("Lost({WORKERD_LOST:?})")), "{line}");
}

/// The Worker's text (workers-rs's rendering of workerd's error) for a fetch whose connection was
/// refused, and for one reset after the request was sent alike: `failover::is_connect_failure`
/// cannot take it for a connect failure.
const WORKERD_LOST: &str = "Error: Network connection lost.";

/// A 502 the Worker made in place of `region`'s answer, in the envelope.
async fn assert_bad_gateway(resp: reqwest::Response, region: &str, says: &str) {
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_eq!(header(&resp, "x-edgerun-region"), region);
    assert!(!header(&resp, "cf-ai-req-id").is_empty());
    assert!(resp.headers().get("location").is_none());
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["success"], false, "{err}");
    assert_eq!(err["result"], Value::Null, "{err}");
    assert_eq!(err["errors"][0]["code"], 3000, "{err}");
    let message = err["errors"][0]["message"].as_str().unwrap();
    assert!(message.starts_with("Bad gateway: "), "{message}");
    assert!(message.contains(says), "{message}");
}

const LOADING: &str = r#"{"errors":[{"code":3040,"message":"model is loading"}],"success":false,"result":null,"messages":[]}"#;

/// The node's answer to a request it did not start (503 while loading).
fn not_started_503() -> Behaviour {
    Behaviour::answer(
        503,
        &[
            ("content-type", "application/json"),
            ("retry-after", "1"),
            (edgerun_protocol::NOT_STARTED_HEADER, "1"),
        ],
        LOADING,
    )
}

/// An error page of Cloudflare (or cloudflared) itself.
fn cloudflare_page(status: u16) -> Behaviour {
    Behaviour::answer(
        status,
        &[("content-type", "text/html; charset=UTF-8")],
        "<!DOCTYPE html><title>error</title>",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_certainly_did_not_start_go_to_another_region() {
    // eu is a scripted stand-in; us a real node behind its Access stand-in.
    let us = Region::start(&[]).await;
    let eu = FakeOrigin::start(not_started_503()).await;
    let worker = worker_for_origins(&eu.base, &us.gate.base, &[]).await;
    let client = reqwest::Client::new();
    let run_path = format!("/run/{MODEL_ALIAS}");
    let from_eu = |req: reqwest::RequestBuilder| {
        req.bearer_auth(CALLER_TOKEN)
            .header(CF_BLOB_HEADER, json!({"continent": "EU"}).to_string())
    };
    let run = |body: &Value| from_eu(client.post(worker.url(&run_path))).body(body.to_string());
    let body = greedy("Once upon a time", 4, false);
    let asked = || (eu.received().len(), us.gate.forwarded());

    // Retried: the node marked its 503 "not started"; Cloudflare reached no origin (521-523, 530).
    for behaviour in [
        not_started_503(),
        cloudflare_page(530),
        cloudflare_page(521),
        cloudflare_page(522),
        cloudflare_page(523),
    ] {
        eu.set(behaviour.clone());
        let before = asked();
        let resp = run(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{behaviour:?}");
        assert_eq!(header(&resp, "x-edgerun-region"), "us");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["success"], true);
        assert_eq!(asked(), (before.0 + 1, before.1 + 1), "{behaviour:?}");
    }
    // A stream fails over the same way: nothing was sent before the switch.
    eu.set(not_started_503());
    let start = Instant::now();
    let resp = run(&greedy("Once upon a time", 8, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "us");
    let events = read_sse(resp, start).await;
    assert!(
        matches!(events.last().unwrap().event, SseEvent::Done),
        "{events:?}"
    );
    let line = worker
        .wait_for_output("answered by us after skipping")
        .await;
    assert!(line.contains("NotStarted(503)"), "{line}");

    // Not retried: whatever may come after the node started generating.
    for (behaviour, stream, says) in [
        (cloudflare_page(502), false, "region eu answered 502"),
        (cloudflare_page(502), true, "region eu answered 502"),
        (cloudflare_page(504), false, "region eu answered 504"),
        (cloudflare_page(520), false, "region eu answered 520"),
        (cloudflare_page(524), false, "region eu answered 524"),
        (Behaviour::Reset, false, "connection to region eu was lost"),
        (Behaviour::Reset, true, "connection to region eu was lost"),
    ] {
        eu.set(behaviour.clone());
        let before = asked();
        let resp = run(&greedy("Once upon a time", 4, stream))
            .send()
            .await
            .unwrap();
        assert_bad_gateway(resp, "eu", says).await;
        assert_eq!(
            asked(),
            (before.0 + 1, before.1),
            "{behaviour:?} (stream: {stream}) went to a second region"
        );
    }
    let line = worker.wait_for_output("Lost(").await;
    assert!(line.contains(&format!("Lost({WORKERD_LOST:?})")), "{line}");
    // A node's own 503 without the mark reaches the caller as it is, and is not retried either.
    eu.set(Behaviour::answer(
        503,
        &[("content-type", "application/json")],
        LOADING,
    ));
    let before = asked();
    let resp = run(&body).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    assert_eq!(resp.text().await.unwrap(), LOADING);
    assert_eq!(asked(), (before.0 + 1, before.1));

    // Access refusing the service token redirects to its login page: never followed, never
    // passed on, never retried; a 502 naming the secrets to check.
    eu.set(Behaviour::answer(
        302,
        &[(
            "location",
            &format!("{}/cdn-cgi/access/login/eu.example.com", eu.base),
        )],
        "",
    ));
    let before = asked();
    let resp = run(&body).send().await.unwrap();
    assert_bad_gateway(resp, "eu", "ACCESS_CLIENT_ID and ACCESS_CLIENT_SECRET").await;
    assert_eq!(
        asked(),
        (before.0 + 1, before.1),
        "the redirect was followed"
    );
    worker.wait_for_output("AccessRejected(302)").await;

    // What reaches a node: the node's credentials, not the caller's; no cookies, no hop-by-hop
    // headers. Run routes carry the node's token, /health only the Access service token.
    eu.set(not_started_503());
    let resp = run(&body)
        .header("cookie", "session=caller-cookie")
        .header("x-end-to-end", "kept")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = eu.received().pop().unwrap();
    assert!(got.request_line.starts_with("POST /run/"), "{got:?}");
    assert_eq!(
        got.header("authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(got.header("cf-access-client-id"), Some(ACCESS_CLIENT_ID));
    assert_eq!(
        got.header("cf-access-client-secret"),
        Some(ACCESS_CLIENT_SECRET)
    );
    assert_eq!(got.header("x-end-to-end"), Some("kept"));
    for dropped in ["cookie", "proxy-authorization", "te"] {
        assert_eq!(
            got.header(dropped),
            None,
            "{dropped} reached the node: {got:?}"
        );
    }
    eu.set(Behaviour::answer(
        200,
        &[("content-type", "application/json")],
        r#"{"status":"ok"}"#,
    ));
    let resp = from_eu(client.get(worker.url("/health?probe=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    let got = eu.received().pop().unwrap();
    assert!(
        got.request_line.starts_with("GET /health?probe=1 "),
        "{got:?}"
    );
    assert_eq!(
        got.header("authorization"),
        None,
        "/health got the node token"
    );
    assert_eq!(got.header("cf-access-client-id"), Some(ACCESS_CLIENT_ID));

    // Only the node's routes leave the Worker: anything else is answered at the edge.
    let before = asked();
    for (method, path, status, allow) in [
        ("GET", "/metrics", 400, None),
        ("GET", "/", 400, None),
        ("DELETE", "/health/x", 400, None),
        ("POST", "/health", 405, Some("GET, HEAD")),
        ("GET", run_path.as_str(), 405, Some("POST")),
        ("PUT", run_path.as_str(), 405, Some("POST")),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = from_eu(client.request(method.clone(), worker.url(path)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(header(&resp, "content-type"), "application/json");
        assert_eq!(
            header(&resp, "allow"),
            allow.unwrap_or(""),
            "{method} {path}"
        );
        let expected = if status == 400 {
            ApiError::no_route()
        } else {
            ApiError::method_not_allowed()
        };
        assert_eq!(
            resp.text().await.unwrap(),
            expected.to_json(),
            "{method} {path}"
        );
    }
    assert_eq!(
        asked(),
        before,
        "a request outside the node's routes left the Worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_region_skipped_is_a_503_or_a_429_when_one_was_busy() {
    let eu = FakeOrigin::start(cloudflare_page(530)).await;
    let us = FakeOrigin::start(not_started_503()).await;
    let worker = worker_for_origins(&eu.base, &us.base, &[]).await;
    let run = || {
        reqwest::Client::new()
            .post(worker.url(&format!("/run/{MODEL_ALIAS}")))
            .bearer_auth(CALLER_TOKEN)
            .body(greedy("Hello", 4, false).to_string())
    };
    let resp = run().send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), "1");
    assert!(resp.headers().get("x-edgerun-region").is_none());
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["success"], false);
    assert_eq!(err["errors"][0]["code"], 3040);
    assert_eq!(
        err["errors"][0]["message"],
        "No edgerun node is available: eu: answered 530; us: answered 503"
    );
    assert_eq!((eu.received().len(), us.received().len()), (1, 1));

    // One of them busy: 429/3040, so the caller knows retrying soon helps.
    us.set(Behaviour::answer(
        429,
        &[("content-type", "application/json"), ("retry-after", "1")],
        &ApiError::capacity().to_json(),
    ));
    let resp = run().send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "1");
    assert_eq!(resp.text().await.unwrap(), ApiError::capacity().to_json());
}

/// Not a test but a measurement: what the Worker (in workerd) adds to a stream, against the same
/// request sent straight to the Access stand-in. Prints medians; asserts nothing about speed.
/// `cargo test --release -p edgerun-e2e --test edge -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures"]
async fn edge_overhead_figures() {
    let d = Deployment::start().await;
    let body = greedy("Write a haiku about the sea.", 32, true);
    let run_path = format!("/run/{MODEL_ALIAS}");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut direct_first, mut direct_total, mut edge_first, mut edge_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..11 {
        for via_worker in [false, true] {
            let req = if via_worker {
                d.run("EU", &body)
            } else {
                d.eu.direct(reqwest::Method::POST, &run_path)
                    .body(body.to_string())
            };
            let start = Instant::now();
            let events = read_sse(req.send().await.unwrap(), start).await;
            let first = events[0].at.as_secs_f64() * 1e3;
            let total = events[events.len() - 1].at.as_secs_f64() * 1e3;
            if via_worker {
                edge_first.push(first);
                edge_total.push(total);
            } else {
                direct_first.push(first);
                direct_total.push(total);
            }
        }
    }
    let (df, dt, ef, et) = (
        median(direct_first),
        median(direct_total),
        median(edge_first),
        median(edge_total),
    );
    println!(
        "first event: direct {df:.1} ms, through the Worker {ef:.1} ms (+{:.1} ms)",
        ef - df
    );
    println!(
        "whole stream (32 tokens): direct {dt:.1} ms, through the Worker {et:.1} ms (+{:.1} ms)",
        et - dt
    );
}
