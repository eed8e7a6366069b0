//! The edge in front of the nodes, on loopback: the Worker (`deploy/worker`, built to wasm) in
//! the real Workers runtime (`workerd` from npm), and a stand-in for what Cloudflare puts between
//! the Worker and a node — the Tunnel plus its Access application. The same workerd harness runs
//! a Worker written for Workers AI with its `AI` binding pointed at edgerun
//! ([`EdgeWorker::binding_client`]).
//!
//! [`AccessGate`] plays Cloudflare Access: it refuses requests without the right service-token
//! headers (`CF-Access-Client-Id`/`-Secret`) with 403, otherwise signs a
//! `Cf-Access-Jwt-Assertion` (RS256, the team's issuer, the application's AUD) with a key it
//! serves at `/cdn-cgi/access/certs`, and streams the request to its node. When the node is
//! down it answers 502, as Cloudflare does when cloudflared cannot reach the origin. Nodes run
//! with `--access-*` pointing at the gate, so they verify real JWTs exactly as in production.
//!
//! [`FakeOrigin`] stands in for a whole region when a test needs an answer no real node gives on
//! demand (Cloudflare's 530, a 503 marked `edgerun-not-started`, a redirect to Access's login
//! page, a connection dropped after the request was read): raw HTTP/1.1 over TCP, one scripted
//! [`Behaviour`] at a time, every request it read kept for inspection.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::{Generate, PrivateKey};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ACCESS_TEAM: &str = "edge-test.cloudflareaccess.com";
pub const ACCESS_AUD: &str = "d4d1e0c9a4e7e6a1c7d0a7e1b0c3f1e2d5c8b9a0f1e2d3c4b5a69788796a5b4c";
pub const ACCESS_CLIENT_ID: &str = "0123456789abcdef.access";
pub const ACCESS_CLIENT_SECRET: &str = "edge-test-access-client-secret";
const KEY_ID: &str = "edge-test-key";

/// The signing key, made once per test binary.
fn signing_key() -> &'static (EncodingKey, Value) {
    static KEY: OnceLock<(EncodingKey, Value)> = OnceLock::new();
    KEY.get_or_init(|| {
        let private = PrivateKey::generate();
        let der = private.to_pkcs1_der().expect("encode key");
        let signing = EncodingKey::from_rsa_der(der.as_bytes());
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&signing, Algorithm::RS256).expect("jwk"))
                .expect("jwk json");
        jwk["kid"] = json!(KEY_ID);
        jwk["alg"] = json!("RS256");
        jwk["use"] = json!("sig");
        (signing, jwk)
    })
}

struct GateState {
    origin: Mutex<Option<String>>,
    forwarded: AtomicUsize,
    last_request_id: Mutex<Option<String>>,
    last_uri: Mutex<Option<String>>,
    client: reqwest::Client,
}

/// Cloudflare Access + Tunnel in front of one node (see the module docs).
pub struct AccessGate {
    pub base: String,
    state: Arc<GateState>,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AccessGate {
    /// Listens on a free loopback port; [`AccessGate::connect`] names the node later (the node
    /// needs the gate's certs URL to start).
    pub async fn start() -> AccessGate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(GateState {
            origin: Mutex::new(None),
            forwarded: AtomicUsize::new(0),
            last_request_id: Mutex::new(None),
            last_uri: Mutex::new(None),
            client: reqwest::Client::new(),
        });
        let app = Router::new()
            .route("/cdn-cgi/access/certs", get(certs))
            .fallback(pass)
            .with_state(state.clone());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        AccessGate {
            base,
            state,
            shutdown: Mutex::new(Some(shutdown)),
            task,
        }
    }

    /// The node this gate forwards to.
    pub fn connect(&self, origin: &str) {
        *self.state.origin.lock().unwrap() = Some(origin.to_string());
    }

    /// `edgerun serve` flags that make a node verify this gate's JWTs.
    pub fn node_flags(&self) -> Vec<String> {
        vec![
            "--access-team-domain".into(),
            ACCESS_TEAM.into(),
            "--access-aud".into(),
            ACCESS_AUD.into(),
            "--access-certs-url".into(),
            format!("{}/cdn-cgi/access/certs", self.base),
        ]
    }

    /// A gate and, behind it, a node that verifies its JWTs, started with `extra` flags.
    pub async fn with_node(extra: &[&str]) -> (AccessGate, crate::Node) {
        let gate = AccessGate::start().await;
        let mut flags = gate.node_flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = crate::Node::start(&flags).await;
        gate.connect(&node.base);
        (gate, node)
    }

    /// Requests passed on to the node so far.
    pub fn forwarded(&self) -> usize {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// The `cf-ai-req-id` of the last request passed on.
    pub fn last_request_id(&self) -> Option<String> {
        self.state.last_request_id.lock().unwrap().clone()
    }

    /// The path and query of the last request passed on.
    pub fn last_uri(&self) -> Option<String> {
        self.state.last_uri.lock().unwrap().clone()
    }

    /// Stops listening and closes idle keep-alive connections too (a graceful shutdown), so the
    /// Worker's next fetch to this region fails to connect rather than reusing one.
    pub async fn stop(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.task.is_finished() {
            assert!(Instant::now() < deadline, "the gate did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A JWT as Access would sign it for the service token.
    pub fn jwt() -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = json!({
            "aud": [ACCESS_AUD],
            "iss": format!("https://{ACCESS_TEAM}"),
            "exp": now + 300,
            "iat": now,
            "nbf": now,
            "type": "app",
            "common_name": ACCESS_CLIENT_ID,
            "sub": "",
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KEY_ID.into());
        encode(&header, &claims, &signing_key().0).expect("sign")
    }
}

impl Drop for AccessGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn certs() -> Json<Value> {
    Json(json!({ "keys": [signing_key().1.clone()] }))
}

/// Headers that are the connection's, not the request's.
fn is_hop_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade"
    )
}

async fn pass(State(gate): State<Arc<GateState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let presented = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let authorized = presented("cf-access-client-id") == Some(ACCESS_CLIENT_ID)
        && presented("cf-access-client-secret") == Some(ACCESS_CLIENT_SECRET);
    if !authorized {
        return (StatusCode::FORBIDDEN, "Forbidden (Access service token)").into_response();
    }
    let Some(origin) = gate.origin.lock().unwrap().clone() else {
        return (StatusCode::BAD_GATEWAY, "no origin").into_response();
    };
    let url = format!(
        "{origin}{}",
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if !is_hop_header(name) && !name.as_str().starts_with("cf-access-client-") {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        "cf-access-jwt-assertion",
        AccessGate::jwt().parse().expect("jwt header"),
    );
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    *gate.last_request_id.lock().unwrap() = parts
        .headers
        .get("cf-ai-req-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    *gate.last_uri.lock().unwrap() = parts.uri.path_and_query().map(|p| p.to_string());
    gate.forwarded.fetch_add(1, Ordering::SeqCst);
    let sent = gate
        .client
        .request(parts.method, url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    match sent {
        Err(e) => (StatusCode::BAD_GATEWAY, format!("origin unreachable: {e}")).into_response(),
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            for (name, value) in resp.headers() {
                if !is_hop_header(name) {
                    out = out.header(name, value);
                }
            }
            // What Access does after a service token passed: a session cookie for the hostname.
            out = out.header(
                "set-cookie",
                format!(
                    "CF_Authorization={}; Path=/; Secure; HttpOnly; SameSite=None",
                    AccessGate::jwt()
                ),
            );
            out.body(Body::from_stream(resp.bytes_stream()))
                .expect("response")
        }
    }
}

/// What a [`FakeOrigin`] does with each request, once it has read all of it.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answers with this status, these headers and this body, then closes the connection.
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Closes the connection (with a TCP reset) without answering: a node that died, or a
    /// connection that broke, after the request reached it.
    Reset,
}

impl Behaviour {
    pub fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Behaviour {
        Behaviour::Answer {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        }
    }
}

/// One request a [`FakeOrigin`] read: the request line, the headers (names lowercased) and the
/// body.
#[derive(Debug, Clone)]
pub struct Received {
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct FakeState {
    behaviour: Mutex<Behaviour>,
    received: Mutex<Vec<Received>>,
}

/// A scripted stand-in for a region (see the module docs). Stops listening on drop or
/// [`FakeOrigin::stop`], after which connections to it are refused.
pub struct FakeOrigin {
    pub base: String,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOrigin {
    pub async fn start(behaviour: Behaviour) -> FakeOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake origin");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(FakeState {
            behaviour: Mutex::new(behaviour),
            received: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_fake(stream, shared.clone()));
            }
        });
        FakeOrigin { base, state, task }
    }

    /// What it does with the next requests.
    pub fn set(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    /// Every request it has read so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Stops listening: from now on connections are refused.
    pub async fn stop(&self) {
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.task.is_finished() {
            assert!(Instant::now() < deadline, "the fake origin did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 request (a `content-length` or chunked body), then behaves.
async fn serve_fake(mut stream: tokio::net::TcpStream, state: Arc<FakeState>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let chunked = value("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length: usize = value("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let complete = |buf: &[u8]| {
        let body = &buf[head_end..];
        if chunked {
            body.ends_with(b"0\r\n\r\n")
        } else {
            body.len() >= length
        }
    };
    while !complete(&buf) {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    state.received.lock().unwrap().push(Received {
        request_line,
        headers,
        body: buf[head_end..].to_vec(),
    });
    let behaviour = state.behaviour.lock().unwrap().clone();
    match behaviour {
        Behaviour::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Behaviour::Answer {
            status,
            headers,
            body,
        } => {
            let mut out = format!("HTTP/1.1 {status} Scripted\r\n");
            for (name, value) in &headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            out.push_str(&format!(
                "content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            ));
            let _ = stream.write_all(out.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}

/// The Worker's build output (`scripts/build-worker.sh`), or `EDGERUN_WORKER_BUILD`.
pub fn worker_build_dir() -> PathBuf {
    std::env::var("EDGERUN_WORKER_BUILD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::workspace_root().join("deploy/worker/build"))
}

/// `workerd` from `deploy/worker/node_modules` (scripts/install-wasm-toolchain.sh), or
/// `WORKERD_BIN`.
pub fn workerd_bin() -> PathBuf {
    std::env::var("WORKERD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::workspace_root().join("deploy/worker/node_modules/.bin/workerd"))
}

/// Where the caller is, for the Worker's region choice: sent as the header workerd turns into
/// `request.cf`.
pub const CF_BLOB_HEADER: &str = "x-edgerun-test-cf";

/// workerd on a free loopback port, running the edge Worker ([`EdgeWorker::start`]), a Workers AI
/// Worker whose `AI` binding points at edgerun ([`EdgeWorker::binding_client`]) or any config
/// ([`EdgeWorker::start_config`]). Killed on drop.
pub struct EdgeWorker {
    child: Child,
    pub base: String,
    /// What workerd printed (the Worker's `console.*` lines among it), also copied to stderr.
    output: Arc<Mutex<String>>,
    _dir: TempDir,
}

impl EdgeWorker {
    /// Starts the Worker with `text` bindings (variables and secrets alike, as in `wrangler dev`)
    /// and `json` ones (a `[vars]` table in wrangler.toml), and waits until it answers.
    pub async fn start(text: &[(&str, String)], json: &[(&str, String)]) -> EdgeWorker {
        let build = worker_build_dir();
        for file in ["index.js", "index_bg.wasm"] {
            assert!(
                build.join(file).exists(),
                "{} is missing: build the Worker with scripts/build-worker.sh (scripts/test.sh does)",
                build.join(file).display()
            );
        }
        let bindings: Vec<String> = text
            .iter()
            .map(|b| binding("text", b))
            .chain(json.iter().map(|b| binding("json", b)))
            .collect();
        let files = [
            ("index.js", build.join("index.js")),
            ("index_bg.wasm", build.join("index_bg.wasm")),
        ];
        Self::start_config(&files, |port| {
            format!(
                r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = .edge),
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [
    (name = "http", address = "127.0.0.1:{port}", service = "main",
     http = (cfBlobHeader = "{CF_BLOB_HEADER}")),
  ],
);
const edge :Workerd.Worker = (
  modules = [
    (name = "index.js", esModule = embed "index.js"),
    (name = "index_bg.wasm", wasm = embed "index_bg.wasm"),
  ],
  compatibilityDate = "2026-04-01",
  bindings = [{bindings}],
);
"#,
                bindings = bindings.join(", "),
            )
        })
        .await
    }

    /// A Worker written for Workers AI (`tests/workers/binding-client.js`: `env.AI.run`, whole
    /// and streamed, `env.AI.models()`, and `new Ai(env.AI)` of the npm `@cloudflare/ai`
    /// package), its `AI` binding wired as docs/api.md shows: workerd's own AI binding module
    /// around the fetcher `deploy/binding/edgerun-ai.js`, which sends its requests to
    /// `edgerun_url` (a node, or the edgerun Worker) with `token`. `@cloudflare/ai` comes from
    /// `scripts/install-sdk-clients.sh` (`cf_ai_modules`: its `EDGERUN_SDK_CF_AI`).
    pub async fn binding_client(
        edgerun_url: &str,
        token: &str,
        model: &str,
        cf_ai_modules: &std::path::Path,
    ) -> EdgeWorker {
        let root = crate::workspace_root();
        let files = [
            ("client.js", root.join("tests/workers/binding-client.js")),
            ("edgerun-ai.js", root.join("deploy/binding/edgerun-ai.js")),
            (
                "cloudflare-ai.js",
                cf_ai_modules.join("@cloudflare/ai/dist/index.js"),
            ),
            ("mustache.mjs", cf_ai_modules.join("mustache/mustache.mjs")),
            ("base64-js.js", cf_ai_modules.join("base64-js/index.js")),
        ];
        let text = |name: &str, value: &str| binding("text", &(name, value.to_string()));
        let shim_bindings = [
            text("EDGERUN_URL", edgerun_url),
            text("EDGERUN_TOKEN", token),
        ];
        let model = text("MODEL", model);
        Self::start_config(&files, |port| {
            // workerd resolves a bare import relative to the importing module's name, so the two
            // packages @cloudflare/ai imports sit under `@cloudflare/`.
            format!(
                r#"using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = .client),
    (name = "edgerun-ai", worker = .shim),
    (name = "internet", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [(name = "http", address = "127.0.0.1:{port}", service = "main")],
);
const client :Workerd.Worker = (
  modules = [
    (name = "client.js", esModule = embed "client.js"),
    (name = "@cloudflare/ai", esModule = embed "cloudflare-ai.js"),
    (name = "@cloudflare/mustache", esModule = embed "mustache.mjs"),
    (name = "@cloudflare/base64-js", commonJsModule = embed "base64-js.js",
     namedExports = ["byteLength", "toByteArray", "fromByteArray"]),
  ],
  compatibilityDate = "2026-04-01",
  bindings = [
    {model},
    (name = "AI", wrapped = (moduleName = "cloudflare-internal:ai-api",
                             innerBindings = [(name = "fetcher", service = "edgerun-ai")])),
  ],
);
const shim :Workerd.Worker = (
  modules = [(name = "edgerun-ai.js", esModule = embed "edgerun-ai.js")],
  compatibilityDate = "2026-04-01",
  bindings = [{shim}],
);
"#,
                shim = shim_bindings.join(", "),
            )
        })
        .await
    }

    /// Starts workerd with the config `config(port)` makes (listening on `port`), the `files`
    /// it embeds (name in the config, file to copy) beside it, and waits until it answers.
    pub async fn start_config(
        files: &[(&str, PathBuf)],
        config: impl FnOnce(u16) -> String,
    ) -> EdgeWorker {
        let port = crate::free_port();
        let dir = TempDir::new("edgerun-workerd");
        // capnp resolves `embed` paths relative to the config file (a leading `/` means the
        // import path, not the file system root): copy the files next to it.
        for (name, from) in files {
            std::fs::copy(from, dir.path.join(name))
                .unwrap_or_else(|e| panic!("copy {} for workerd: {e}", from.display()));
        }
        let config_path = dir.path.join("config.capnp");
        std::fs::write(&config_path, config(port)).expect("write workerd config");
        let mut child = Command::new(workerd_bin())
            .arg("serve")
            .arg(&config_path)
            .arg("--experimental")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn workerd (run scripts/install-wasm-toolchain.sh)");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>);
        for pipe in [stdout, stderr].into_iter().flatten() {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("workerd: {line}");
                    let mut all = output.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        let mut worker = EdgeWorker {
            child,
            base: format!("http://127.0.0.1:{port}"),
            output,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.get(worker.url("/")).send().await.is_err() {
            if let Ok(Some(status)) = worker.child.try_wait() {
                panic!("workerd exited with {status} (its output is above)");
            }
            assert!(Instant::now() < deadline, "workerd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything workerd has printed so far (the Worker's log lines among it).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until workerd has printed a line containing `needle` (log lines arrive a little
    /// after the answer), and returns that line.
    pub async fn wait_for_output(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.output().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "workerd printed no line containing {needle:?}; it printed:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EdgeWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binding of `kind` (`text`, `json`) in workerd's config.
fn binding(kind: &str, (name, value): &(&str, String)) -> String {
    format!(
        "(name = {}, {kind} = {})",
        capnp_string(name),
        capnp_string(value)
    )
}

/// A capnp text literal.
fn capnp_string(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

/// A directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads a streamed body chunk by chunk, noting when each chunk arrived.
pub async fn chunks_with_times(resp: reqwest::Response, start: Instant) -> Vec<(Duration, usize)> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        out.push((start.elapsed(), chunk.expect("chunk").len()));
    }
    out
}
