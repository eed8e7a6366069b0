//! The listener: accepting connections, bounding what each may cost, and draining.
//!
//! axum's own `serve` runs hyper without any timer or connection limit, so a client that sends
//! one byte a second, or opens connections and says nothing, holds them forever. This loop
//! serves the same router with:
//!
//! * **a cap on open connections** ([`ConnectionLimits::max_connections`]): beyond it a new
//!   connection gets `503` in the Workers AI envelope (`Retry-After`, `edgerun-not-started`,
//!   `Connection: close`) and is closed, so a flood costs one small write per connection;
//! * **a header-read timeout**: from a connection's start, or the first byte of a keep-alive
//!   connection's next request, to the end of the request head;
//! * **an idle timeout**: a keep-alive connection with no request in flight and no byte read or
//!   written for this long is closed;
//! * **a write-stall timeout**: a connection whose client has stopped reading (a write blocked
//!   this long) is closed, request in flight or not, except while it streams a generation the
//!   engine still holds ([`StreamLiveness`]): the engine pauses such a stream and, after its
//!   stalled-stream timeout, drops it with an error event; the write-stall clock starts again
//!   from then, so a client that reads again in time finds the error and the end of the stream
//!   rather than a cut (and the node counts a stall, not a cancellation). The kernel's send
//!   buffer is bounded too, so a stream's client that stops reading is noticed within about a
//!   thousand events;
//! * **a graceful drain**: when `shutdown` resolves, busy connections close after their
//!   answers, and every later answer says `Connection: close`; the listener and idle
//!   connections keep answering, so that `/health` says "draining" and run requests get a 503
//!   marked not-started (closing an idle keep-alive connection at once would lose a request
//!   racing the close: a proxy could not know it never started). The drain ends when no request
//!   is in flight; then the process exits and idle connections close with it, so a request
//!   racing that moment can still be lost: load balancers should stop sending on `draining`.
//!
//! HTTP/1.1 only: what cloudflared, the Worker's fetch and curl speak to an origin, and what the
//! per-request timing above is defined for.
//!
//! A request in flight is never timed out here: its body has its own deadline and minimum rate
//! (`routes::read_body`), a stream whose client stops reading is paused and then dropped by the
//! engine, and at the drain deadline `main` cuts whatever still runs (`Drain`).
//!
//! Timing is kept per connection by a watchdog beside hyper's connection future: it sees the
//! bytes read and written (through its socket wrapper, `Watched`) and the requests in flight (through the service wrapper),
//! and drops the connection, which closes the socket, when a limit passes.
//!
//! This file holds the limits, the accept loop with its drain, the watchdog and the service
//! wrapper; `watched` holds the socket wrapper and the reading of a refused request's head
//! that gives hyper's bare errors their route's shape.

use crate::telemetry;

mod watched;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bytes::Bytes;
use edgerun_protocol::ApiError;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use watched::Watched;

/// What one connection may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time to receive a request head.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may sit with nothing in flight.
    pub idle_timeout: Duration,
    /// Time a write to the client may stay blocked (a client that stopped reading) before the
    /// connection is closed, request in flight or not.
    pub write_stall_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Kernel send buffer per connection (Linux doubles it). Token events are tens of bytes each,
/// so this holds hundreds of them; answers larger than it just take more writes.
const SEND_BUFFER_BYTES: usize = 16 * 1024;

/// Connections turned away at the cap that may still be answered at once (each is a small
/// write and a short wait for the client's request bytes); beyond these they are just closed.
const MAX_REFUSING: usize = 256;

/// Serves `app` on `listener` until `shutdown` resolves, then drains: returns once no request
/// is in flight (idle connections are dropped with the runtime). (Marking the node as draining, so that handlers refuse new work, is
/// the caller's part: `Drain::start`.)
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut draining = false;
    let mut drain_check = tokio::time::interval(Duration::from_millis(20));
    loop {
        let accepted = if draining {
            // Still answering (health checks see "draining", run requests a 503 that tells
            // the Worker to go elsewhere) until no request is in flight.
            tokio::select! {
                accepted = listener.accept() => accepted,
                _ = drain_check.tick() => {
                    if requests.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    continue;
                }
            }
        } else {
            tokio::select! {
                _ = &mut shutdown => {
                    draining = true;
                    let _ = stop_tx.send(true);
                    tracing::info!(
                        open = open.load(Ordering::Relaxed),
                        requests = requests.load(Ordering::Relaxed),
                        "draining: connections close after their answers"
                    );
                    continue;
                }
                accepted = listener.accept() => accepted,
            }
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // A bounded kernel buffer (autotuning grows it to 4 MiB per socket otherwise): what a
        // client that stops reading can make the node hold, and how soon the engine notices.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES);
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            metrics::counter!(telemetry::CONNECTIONS_REFUSED).increment(1);
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        }
        let guard = OpenConnection::new(open.clone());
        let app = app.clone();
        let stop = stop_rx.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            serve_connection(stream, app, limits, stop, requests).await;
            drop(guard);
        });
    }
}

/// Counts an open connection while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>) -> Self {
        let n = open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(telemetry::OPEN_CONNECTIONS).set(n as f64);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let n = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(telemetry::OPEN_CONNECTIONS).set(n as f64);
    }
}

/// The answer for a connection over the cap: 503 in the envelope, then close. The client's
/// request bytes are read (briefly) before closing so that the close does not reset the
/// connection under the answer.
async fn refuse(mut stream: TcpStream) {
    let error = ApiError::unavailable("the node has too many open connections, try again");
    let body = error.to_json();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
         retry-after: 1\r\n{}: 1\r\n{}: {}\r\nconnection: close\r\n\r\n",
        edgerun_protocol::JSON_CONTENT_TYPE,
        body.len(),
        edgerun_protocol::NOT_STARTED_HEADER,
        edgerun_protocol::REQUEST_ID_HEADER,
        crate::routes::new_request_id(),
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        loop {
            if tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// What the watchdog knows about one connection. Times are milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    /// Requests whose answers are not finished.
    in_flight: AtomicUsize,
    /// When the request head now being read began (`u64::MAX`: none is being read).
    head_started: AtomicU64,
    /// The last byte read or written, or the last answer finished.
    last_active: AtomicU64,
    /// Since when a write has been blocked (`u64::MAX`: none is).
    write_blocked_since: AtomicU64,
    /// Requests handed to the service so far (to tell hyper's own answers from ours).
    services: AtomicU64,
    /// The streamed generation the answer in flight carries, if any, and when the watchdog
    /// first saw the engine done with it (`u64::MAX`: not yet).
    stream: Mutex<Option<(StreamLiveness, u64)>>,
}

/// Marks a streamed generation's response (in its extensions) with a way to ask whether the
/// engine still holds the generation. While it does, a blocked write does not close the
/// connection: the engine bounds a stream whose client stopped reading (it drops the sequence
/// after its stalled-stream timeout and ends the stream with an error event), and a client
/// that reads again within the write-stall timeout after that finds the event and the end of
/// the stream instead of a cut.
#[derive(Clone)]
pub struct StreamLiveness(Arc<dyn Fn() -> bool + Send + Sync>);

impl StreamLiveness {
    /// `live`: whether the engine still holds the generation.
    pub fn new(live: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(live))
    }

    fn live(&self) -> bool {
        (self.0)()
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            // A new connection is reading its first request head from the start.
            head_started: AtomicU64::new(0),
            last_active: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(u64::MAX),
            services: AtomicU64::new(0),
            stream: Mutex::new(None),
        }
    }

    fn wrote(&self, progressed: bool) {
        if progressed {
            self.last_active.store(self.now(), Ordering::Relaxed);
            self.write_blocked_since.store(u64::MAX, Ordering::Relaxed);
        } else {
            let _ = self.write_blocked_since.compare_exchange(
                u64::MAX,
                self.now(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn read_some(&self) {
        let now = self.now();
        self.last_active.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let _ = self.head_started.compare_exchange(
                u64::MAX,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn request_started(&self) {
        self.services.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(u64::MAX, Ordering::Relaxed);
    }

    /// The answer in flight streams a generation.
    fn streaming(&self, liveness: StreamLiveness) {
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some((liveness, u64::MAX));
    }

    /// When a blocked write began to count against the write-stall timeout: when it blocked,
    /// or, for a streamed generation, once the engine let the generation go (`None` while it
    /// holds it: the engine's stalled-stream timeout is the bound then).
    fn write_stall_clock(&self, blocked: u64, now: u64) -> Option<u64> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let Some((liveness, retired_at)) = stream.as_mut() else {
            return Some(blocked);
        };
        if *retired_at == u64::MAX {
            if liveness.live() {
                return None;
            }
            *retired_at = now;
        }
        Some(blocked.max(*retired_at))
    }

    fn request_finished(&self) {
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.last_active.store(self.now(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Which limit, if any, the connection has passed.
    fn expired(&self, limits: &ConnectionLimits) -> Option<&'static str> {
        let now = self.now();
        let blocked = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked != u64::MAX {
            let clock = self.write_stall_clock(blocked, now);
            if clock.is_some_and(|since| {
                now.saturating_sub(since) > limits.write_stall_timeout.as_millis() as u64
            }) {
                return Some("write stalled");
            }
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != u64::MAX {
            if now.saturating_sub(head) > limits.header_read_timeout.as_millis() as u64 {
                return Some("header read timeout");
            }
            return None;
        }
        let idle = now.saturating_sub(self.last_active.load(Ordering::Relaxed));
        (idle > limits.idle_timeout.as_millis() as u64).then_some("idle timeout")
    }
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
    requests: Arc<AtomicUsize>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        io: stream,
        activity: activity.clone(),
        replacing: None,
        heads: 0,
        head: Vec::new(),
        head_after: 0,
    });
    let service = {
        let activity = activity.clone();
        let stop = stop.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let app = app.clone();
            let tracker = InFlight::new(activity.clone(), requests.clone());
            let draining = *stop.borrow();
            async move {
                let mut resp = tower::ServiceExt::oneshot(app, req.map(Body::new)).await?;
                if let Some(liveness) = resp.extensions().get::<StreamLiveness>() {
                    tracker.0.streaming(liveness.clone());
                }
                if draining {
                    // Draining: answer, then close (hyper honours the header).
                    resp.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    Body::new(Tracked {
                        inner: body,
                        _tracker: tracker,
                    })
                }))
            }
        })
    };
    let builder = Builder::new(TokioExecutor::new()).http1_only();
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let tick = (limits
        .header_read_timeout
        .min(limits.idle_timeout)
        .min(limits.write_stall_timeout)
        / 4)
    .clamp(Duration::from_millis(10), Duration::from_secs(1));
    // Draining: a connection busy when it starts closes after its answer; an idle one stays
    // open (a request racing the close would be lost, not refused) and answers with
    // `Connection: close` (503 not-started for run requests) until the drain ends.
    let mut stopping = *stop.borrow();
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() && activity.in_flight.load(Ordering::Relaxed) > 0 {
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep(tick) => {
                if let Some(why) = activity.expired(&limits) {
                    tracing::debug!(reason = why, "closing a connection");
                    metrics::counter!(telemetry::CONNECTIONS_TIMED_OUT, "reason" => why)
                        .increment(1);
                    return;
                }
            }
        }
    }
}

/// Marks a request in flight, on its connection and node-wide, from the service call until its
/// response body is dropped (sent or abandoned).
struct InFlight(Arc<Activity>, Arc<AtomicUsize>);

impl InFlight {
    fn new(activity: Arc<Activity>, requests: Arc<AtomicUsize>) -> Self {
        activity.request_started();
        requests.fetch_add(1, Ordering::Relaxed);
        Self(activity, requests)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight.
struct Tracked {
    inner: Body,
    _tracker: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::watched::{envelope_for_bare_error, path_of_head, style_of_head, HEAD_PREFIX};
    use super::*;
    use edgerun_protocol::ErrorStyle;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            write_stall_timeout: Duration::from_millis(200),
        }
    }

    #[test]
    fn a_new_connection_must_send_its_head_in_time() {
        let a = Activity::new();
        assert_eq!(a.expired(&limits()), None);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.expired(&limits()), Some("header read timeout"));
    }

    #[test]
    fn requests_in_flight_never_expire_and_idle_follows_the_answer() {
        let a = Activity::new();
        a.read_some();
        a.request_started();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.expired(&limits()), None, "in flight");
        a.request_finished();
        assert_eq!(a.expired(&limits()), None, "just answered");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.expired(&limits()), None, "idle, under the idle timeout");
        // The next request's first byte starts the header clock.
        a.read_some();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(a.expired(&limits()), Some("header read timeout"));
    }

    #[test]
    fn hyper_bare_errors_get_the_envelope() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let cloudflare = ErrorStyle::Cloudflare;
        let answer = String::from_utf8(envelope_for_bare_error(bare, cloudflare).unwrap()).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("content-type: application/json\r\n"),
            "{answer}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["errors"][0]["code"], 5006);
        let large = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(envelope_for_bare_error(large, cloudflare).is_some());
        // Our own answers (with bodies) and non-HTTP/1 bytes are left alone.
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
        assert!(envelope_for_bare_error(ok, cloudflare).is_none());
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 9\r\n\r\n";
        assert!(envelope_for_bare_error(with_body, cloudflare).is_none());
        assert!(envelope_for_bare_error(&[0, 0, 4, 1], cloudflare).is_none());
    }

    #[test]
    fn hyper_bare_errors_take_the_style_of_the_requests_route() {
        let bare = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n";
        let body = |head: &[u8]| {
            let answer = envelope_for_bare_error(bare, style_of_head(head)).unwrap();
            let answer = String::from_utf8(answer).unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 414 URI Too Long\r\n"),
                "{answer}"
            );
            let body = answer.split("\r\n\r\n").nth(1).unwrap().to_string();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        };
        let long = format!("GET /v1/models/{} HTTP/1.1\r\n", "x".repeat(300));
        let v = body(&long.as_bytes()[..HEAD_PREFIX]);
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v.get("errors").is_none(), "{v}");
        let v = body(b"POST /run?version=3 HTTP/1.1\r\nhost: x\r\n");
        assert_eq!(v["internalCode"], 3000, "{v}");
        for head in [
            &b"POST /run/@cf/meta/x HTTP/1.1\r\n"[..],
            b"POST /client/v4/accounts/a/ai/v1/chat/completions HTTP/1.1\r\n",
            // Nothing readable: Cloudflare's envelope, as before.
            b"",
        ] {
            let v = body(head);
            assert_eq!(v["success"], false, "{v}");
            assert_eq!(v["errors"][0]["code"], 3000, "{v}");
        }
    }

    #[test]
    fn the_path_of_a_request_head() {
        for (head, path) in [
            (&b"GET /v1/models HTTP/1.1\r\n"[..], Some("/v1/models")),
            (b"POST /run?version=3 HTTP/1.1\r\n", Some("/run")),
            (b"GET /v1/models/abc", Some("/v1/models/abc")),
            (b"GET http://host:8080/v1/x HTTP/1.1\r\n", Some("/v1/x")),
            (b"GET * HTTP/1.1\r\n", None),
            (b"get /v1/x HTTP/1.1\r\n", None),
            (b"\x16\x03\x01", None),
            (b"", None),
        ] {
            assert_eq!(
                path_of_head(head),
                path,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn a_blocked_write_closes_even_with_a_request_in_flight() {
        let a = Activity::new();
        a.read_some();
        a.request_started();
        a.wrote(false);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(a.expired(&limits()), None, "blocked, under the limit");
        a.wrote(true);
        a.wrote(false);
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(a.expired(&limits()), None, "progress restarted the clock");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(a.expired(&limits()), Some("write stalled"));
    }

    #[test]
    fn a_stream_the_engine_holds_is_the_engines_to_time_out_then_the_clock_restarts() {
        use std::sync::atomic::AtomicBool;
        let a = Activity::new();
        a.read_some();
        a.request_started();
        let live = Arc::new(AtomicBool::new(true));
        let flag = live.clone();
        a.streaming(StreamLiveness::new(move || flag.load(Ordering::Relaxed)));
        a.wrote(false);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(a.expired(&limits()), None, "the engine still holds it");
        // The engine dropped it (stalled): the client gets the write-stall time again from now.
        live.store(false, Ordering::Relaxed);
        assert_eq!(a.expired(&limits()), None, "just let go");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(a.expired(&limits()), None, "under the limit since the end");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(a.expired(&limits()), Some("write stalled"));
        // The next answer on the connection is not a stream: the plain rule again.
        a.wrote(true);
        a.request_finished();
        a.read_some();
        a.request_started();
        a.wrote(false);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(a.expired(&limits()), Some("write stalled"));
    }

    #[test]
    fn an_idle_keep_alive_connection_closes() {
        let a = Activity::new();
        a.read_some();
        a.request_started();
        a.request_finished();
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(a.expired(&limits()), Some("idle timeout"));
    }
}
