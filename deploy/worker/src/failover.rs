//! Sending a request to the regions in order until one answers — retrying elsewhere only what
//! the first node certainly did not start.
//!
//! A generation that ran on one node and is sent again to another runs twice: the caller is
//! billed (in time, and in whatever the answer drives) for two, and sees only one. So a region is
//! skipped, and the next one tried, only when the request certainly never started there:
//!
//! * **the fetch failed before the request was sent**: a connection that could not be made
//!   (refused, unreachable, DNS). The runtime reports only a message; [`is_connect_failure`]
//!   reads it, and anything it does not recognise counts as "may have been sent". workerd gives
//!   the same `Network connection lost.` for a refused connection and for one reset after the
//!   request went out (tests/tests/edge.rs pins this), so a Worker in workerd retries no fetch
//!   error at all; on Cloudflare a node that cannot be reached shows up as the statuses below.
//! * **Cloudflare could not reach the origin at all** (no TCP connection was made): 521 (origin
//!   refused), 522 (connection timed out), 523 (origin unreachable), 530 (with a Tunnel: no
//!   `cloudflared` connected for the hostname, error 1033).
//! * **the node said so**: an error answer carrying [`NOT_STARTED_HEADER`] (`edgerun-not-started:
//!   1`), which the node sets on its 503s while loading, draining or over its connection cap, on
//!   429 / 3040 when busy, and on 503 when its Access keys are too stale to trust.
//! * **429 with code 3040** (busy), header or not: the node queues nothing it refuses.
//!
//! Everything else ends the search, because the node may have generated already: 502 (with a
//! Tunnel, `cloudflared` could not complete the request to the node, which may have died while
//! generating), 503 without the header, 504, 520, 524, and a connection lost after the request
//! was sent. Such an answer reaches the caller as it is when it is the node's own (its body in the
//! Workers AI envelope, `application/json`) and as a 502 in the envelope otherwise
//! ([`Failure::NotTheNode`]: Cloudflare's or `cloudflared`'s HTML pages never reach a Workers AI
//! client). A redirect (Cloudflare Access sends a request with a wrong or missing service token to
//! its login page) is never followed and never passed on either: it becomes a 502 saying the
//! node's Access refused the Worker's credentials ([`Failure::AccessRejected`]). Any other answer,
//! error or not, goes to the caller as it is — its body streams through untouched — and once it
//! has, the Worker never retries.
//!
//! [`forward`] is generic over [`Upstream`] so that the host's tests drive it with a scripted
//! upstream and the Worker with `fetch`.

use crate::balance::Node;
use edgerun_protocol::{ApiError, NOT_STARTED_HEADER};

/// Largest 429 body read to look for code 3040; a node's error envelope is far smaller.
pub const MAX_PEEK_BYTES: usize = 16 * 1024;

/// One way of sending the request to a node.
#[allow(async_fn_in_trait)] // the Worker's futures are !Send by nature (single-threaded wasm)
pub trait Upstream {
    /// A response whose body has not been read.
    type Response;
    /// Sends the request to `node`, never following redirects; `Err` with the runtime's message
    /// when no HTTP answer came back (connect error, reset, ...).
    async fn send(&mut self, node: &Node<'_>) -> Result<Self::Response, String>;
    /// The response's status code.
    fn status(response: &Self::Response) -> u16;
    /// A response header's value (the first, when there are several).
    fn header(response: &Self::Response, name: &str) -> Option<String>;
    /// Reads the (small) body of a 429 and returns a response that still carries all of it,
    /// with the first [`MAX_PEEK_BYTES`] to decide whether it means "busy".
    async fn peek(&mut self, response: Self::Response)
        -> Result<(Self::Response, Vec<u8>), String>;
}

/// Why a node was skipped: each reason means the request certainly did not start there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The node's [`Node::label`].
    pub node: String,
    pub reason: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The connection could not be made ([`is_connect_failure`]); the runtime's message.
    Unreachable(String),
    /// 521/522/523/530: Cloudflare made no connection to the origin.
    OriginUnreachable(u16),
    /// An error answer with [`NOT_STARTED_HEADER`]: loading, draining, over the connection cap,
    /// stale Access keys.
    NotStarted(u16),
    /// 429 with code 3040: the node's queue is full.
    Busy,
}

/// Why a region's answer is replaced by the Worker's own error, without trying another region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The fetch failed, and not provably before the request was sent (connection lost or reset,
    /// an unrecognised error); the runtime's message, for the log.
    Lost(String),
    /// A 3xx: Cloudflare Access redirecting to its login page (wrong or missing service token).
    AccessRejected(u16),
    /// An error status whose body is not the node's (not `application/json`): Cloudflare's,
    /// `cloudflared`'s or Access's own page.
    NotTheNode(u16),
}

impl Failure {
    /// The caller's error for this failure at `region`: 502 in the Workers AI envelope. The
    /// runtime's message stays in the Worker's log.
    pub fn api_error(&self, region: &str) -> ApiError {
        let message = match self {
            Failure::Lost(_) => format!(
                "Bad gateway: the connection to region {region} was lost before it answered; \
                 not retried elsewhere, as the node may have started the request"
            ),
            Failure::AccessRejected(status) => format!(
                "Bad gateway: Cloudflare Access in front of region {region} rejected the \
                 Worker's credentials (it answered {status}, a redirect to its login page): \
                 check the ACCESS_CLIENT_ID and ACCESS_CLIENT_SECRET secrets"
            ),
            Failure::NotTheNode(status @ (401 | 403)) => format!(
                "Bad gateway: region {region} answered {status} without reaching the node's \
                 API (Cloudflare Access refusing the Worker's service token answers so): check \
                 the ACCESS_CLIENT_ID and ACCESS_CLIENT_SECRET secrets"
            ),
            Failure::NotTheNode(status) => format!(
                "Bad gateway: region {region} answered {status} without reaching the node's \
                 API; not retried elsewhere, as the node may have started the request"
            ),
        };
        ApiError::new(502, BAD_GATEWAY_CODE, message)
    }
}

/// The code of the Worker's 502s: Cloudflare's internal-error code (the node's 500s use it too).
pub const BAD_GATEWAY_CODE: u32 = 3000;

/// The result of [`forward`].
pub enum Forwarded<R> {
    /// A node answered (its [`Node::label`]); `skipped` lists those tried before it.
    Answered {
        node: String,
        response: R,
        skipped: Vec<Skipped>,
    },
    /// A region failed in a way that may have started the request: the caller gets
    /// [`Failure::api_error`], and no other node is tried.
    Failed {
        node: String,
        failure: Failure,
        skipped: Vec<Skipped>,
    },
    /// Every node was skipped.
    NoRegion(Vec<Skipped>),
}

/// Whether a fetch error message certainly means the connection was never made (so the request
/// was never sent): connection refused, could not connect, host unreachable, a DNS failure.
/// Matched case-insensitively on the runtime's text; anything else (`Network connection lost.`,
/// resets, timeouts, `internal error; reference = ...`) may have happened after the request left,
/// and is not retried.
pub fn is_connect_failure(message: &str) -> bool {
    const CONNECT_FAILURES: &[&str] = &[
        "connection refused",
        "econnrefused",
        "could not connect",
        "couldn't connect",
        "failed to connect",
        "unable to connect",
        "host unreachable",
        "network unreachable",
        "no route to host",
        "dns",
        "name not resolved",
        "name resolution",
        "could not resolve",
        "failed to resolve",
        "enotfound",
    ];
    let message = message.to_ascii_lowercase();
    CONNECT_FAILURES.iter().any(|f| message.contains(f))
}

/// What to make of an answer before reading its body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// The caller gets it as it is (for a 429: unless its body says 3040).
    Pass,
    Skip(SkipReason),
    Fail(Failure),
}

/// The rule of the module docs, on the status, the content type and [`NOT_STARTED_HEADER`].
fn verdict(status: u16, content_type: Option<&str>, not_started: Option<&str>) -> Verdict {
    let not_started = not_started.is_some_and(|v| v.trim() == "1");
    match status {
        300..=399 => Verdict::Fail(Failure::AccessRejected(status)),
        429 if not_started => Verdict::Skip(SkipReason::Busy),
        400.. if not_started => Verdict::Skip(SkipReason::NotStarted(status)),
        521 | 522 | 523 | 530 => Verdict::Skip(SkipReason::OriginUnreachable(status)),
        400.. if !is_json(content_type) => Verdict::Fail(Failure::NotTheNode(status)),
        _ => Verdict::Pass,
    }
}

/// Whether a content type is the node's `application/json` (parameters allowed).
fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// Whether a 429 body is the Workers AI capacity error (code 3040): an `errors` item with that
/// code, as the node's envelope and its binding-style body both carry.
pub fn is_capacity_error(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<edgerun_protocol::ErrorItem>,
    }
    serde_json::from_slice::<Errors>(body)
        .map(|e| e.errors.iter().any(|item| item.code == 3040))
        .unwrap_or(false)
}

/// Tries `nodes` in order (a region's nodes as [`crate::balance`] ranks them, then the next
/// region's); see the module docs for when a node is skipped.
pub async fn forward<U: Upstream>(upstream: &mut U, nodes: &[Node<'_>]) -> Forwarded<U::Response> {
    let mut skipped = Vec::new();
    for node in nodes {
        let name = node.label();
        let skip = |reason| Skipped {
            node: node.label(),
            reason,
        };
        let response = match upstream.send(node).await {
            Ok(r) => r,
            Err(e) if is_connect_failure(&e) => {
                skipped.push(skip(SkipReason::Unreachable(e)));
                continue;
            }
            Err(e) => {
                return Forwarded::Failed {
                    node: name,
                    failure: Failure::Lost(e),
                    skipped,
                }
            }
        };
        let status = U::status(&response);
        let content_type = U::header(&response, "content-type");
        let not_started = U::header(&response, NOT_STARTED_HEADER);
        let failure = match verdict(status, content_type.as_deref(), not_started.as_deref()) {
            Verdict::Skip(reason) => {
                skipped.push(skip(reason));
                continue;
            }
            Verdict::Fail(failure) => failure,
            Verdict::Pass if status == 429 => match upstream.peek(response).await {
                Ok((_, body)) if is_capacity_error(&body) => {
                    skipped.push(skip(SkipReason::Busy));
                    continue;
                }
                Ok((response, _)) => {
                    return Forwarded::Answered {
                        node: name,
                        response,
                        skipped,
                    }
                }
                // The 429's body was lost: whether it meant "busy" is unknown.
                Err(e) => Failure::Lost(e),
            },
            Verdict::Pass => {
                return Forwarded::Answered {
                    node: name,
                    response,
                    skipped,
                }
            }
        };
        return Forwarded::Failed {
            node: name,
            failure,
            skipped,
        };
    }
    Forwarded::NoRegion(skipped)
}

/// The caller's error when every region was skipped: 429/3040 if any node was merely busy
/// (retrying soon helps), otherwise 503 naming what happened to each region (none of them
/// started the request, so the caller may send it again).
pub fn no_region_error(skipped: &[Skipped]) -> ApiError {
    if skipped.iter().any(|s| s.reason == SkipReason::Busy) {
        return ApiError::capacity();
    }
    let detail: Vec<String> = skipped
        .iter()
        .map(|s| match &s.reason {
            // The fetch error itself goes to the Worker's log, not to callers.
            SkipReason::Unreachable(_) => format!("{}: unreachable", s.node),
            SkipReason::OriginUnreachable(status) | SkipReason::NotStarted(status) => {
                format!("{}: answered {status}", s.node)
            }
            SkipReason::Busy => format!("{}: busy", s.node),
        })
        .collect();
    ApiError::unavailable(format!(
        "No edgerun node is available: {}",
        if detail.is_empty() {
            "none configured".to_string()
        } else {
            detail.join("; ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Region;
    use std::collections::VecDeque;

    /// A scripted answer: status, headers, body.
    #[derive(Debug, Clone, PartialEq)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Resp {
        Resp {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        }
    }

    /// The node's own answer: its envelope, `application/json`.
    fn node(status: u16, body: &str) -> Resp {
        resp(status, &[("content-type", "application/json")], body)
    }

    /// The node's answer to a request it did not start.
    fn not_started(status: u16, body: &str) -> Resp {
        resp(
            status,
            &[
                ("content-type", "application/json"),
                (NOT_STARTED_HEADER, "1"),
            ],
            body,
        )
    }

    /// Cloudflare's (or cloudflared's) own error page.
    fn page(status: u16) -> Resp {
        resp(
            status,
            &[("content-type", "text/html; charset=UTF-8")],
            "<html>error</html>",
        )
    }

    /// What a region does when asked: answer, or fail with the runtime's message.
    type Answer = Result<Resp, String>;

    /// A scripted upstream: each region answers with the next entry of its script.
    struct Script {
        answers: Vec<(String, VecDeque<Answer>)>,
        sent: Vec<String>,
        peeked: usize,
        peek_fails: bool,
    }

    impl Script {
        fn new(answers: &[(&str, Result<Resp, &str>)]) -> Self {
            let mut s = Script {
                answers: Vec::new(),
                sent: Vec::new(),
                peeked: 0,
                peek_fails: false,
            };
            for (region, answer) in answers {
                let answer = answer.clone().map_err(str::to_string);
                match s.answers.iter_mut().find(|(r, _)| r == region) {
                    Some((_, q)) => q.push_back(answer),
                    None => s
                        .answers
                        .push((region.to_string(), VecDeque::from([answer]))),
                }
            }
            s
        }
    }

    impl Upstream for Script {
        type Response = Resp;
        async fn send(&mut self, node: &Node<'_>) -> Result<Resp, String> {
            self.sent.push(node.label());
            self.answers
                .iter_mut()
                .find(|(r, _)| *r == node.label())
                .and_then(|(_, q)| q.pop_front())
                .unwrap_or_else(|| Err("connection refused (no script)".into()))
        }
        fn status(r: &Resp) -> u16 {
            r.status
        }
        fn header(r: &Resp, name: &str) -> Option<String> {
            r.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        }
        async fn peek(&mut self, r: Resp) -> Result<(Resp, Vec<u8>), String> {
            self.peeked += 1;
            if self.peek_fails {
                return Err(WORKERD_LOST.into());
            }
            let body = r.body.as_bytes().to_vec();
            Ok((r, body))
        }
    }

    fn regions() -> Vec<Region> {
        ["eu", "us", "ap"]
            .iter()
            .map(|n| Region {
                name: n.to_string(),
                origin: None,
                origins: vec![format!("https://{n}.example.com")],
                continents: vec![],
                countries: vec![],
                colos: vec![],
                token_secret: None,
                models: None,
            })
            .collect()
    }

    fn run(script: &mut Script) -> Forwarded<Resp> {
        let regions = regions();
        let order: Vec<Node> = regions
            .iter()
            .map(|r| Node {
                region: r,
                index: 0,
            })
            .collect();
        futures_executor::block_on(forward(script, &order))
    }

    /// `(region, status, body)` of the answer the caller gets as it is, and the skipped list.
    fn answered(script: &mut Script) -> (String, Resp, Vec<Skipped>) {
        match run(script) {
            Forwarded::Answered {
                node,
                response,
                skipped,
            } => (node, response, skipped),
            Forwarded::Failed { node, failure, .. } => panic!("{node} failed: {failure:?}"),
            Forwarded::NoRegion(skipped) => panic!("no region: {skipped:?}"),
        }
    }

    fn failed(script: &mut Script) -> (String, Failure, Vec<Skipped>) {
        match run(script) {
            Forwarded::Failed {
                node,
                failure,
                skipped,
            } => (node, failure, skipped),
            Forwarded::Answered { node, response, .. } => panic!("{node} answered {response:?}"),
            Forwarded::NoRegion(skipped) => panic!("no region: {skipped:?}"),
        }
    }

    const BUSY: &str = r#"{"errors":[{"code":3040,"message":"Capacity temporarily exceeded, please try again."}],"success":false,"result":null,"messages":[]}"#;
    const RATE: &str = r#"{"errors":[{"code":3036,"message":"rate limited"}],"success":false,"result":null,"messages":[]}"#;
    const LOADING: &str = r#"{"errors":[{"code":3040,"message":"model is loading"}],"success":false,"result":null,"messages":[]}"#;
    /// The fetch error the Worker gets from workerd for a refused connection and for one reset
    /// after sending alike (as tests/tests/edge.rs sees it).
    const WORKERD_LOST: &str = "Error: Network connection lost.";

    #[test]
    fn first_healthy_region_answers() {
        let mut s = Script::new(&[("eu", Ok(resp(200, &[], "stream")))]);
        let (region, response, skipped) = answered(&mut s);
        assert_eq!((region.as_str(), response.status), ("eu", 200));
        assert!(skipped.is_empty());
        assert_eq!(s.sent, ["eu"]);
        assert_eq!(s.peeked, 0, "a 200 body is never read by the Worker");
    }

    #[test]
    fn requests_that_certainly_did_not_start_go_to_the_next_region() {
        for (down, reason) in [
            (
                Err("connect(): Connection refused"),
                SkipReason::Unreachable("connect(): Connection refused".into()),
            ),
            (
                Err("TypeError: could not connect to the origin"),
                SkipReason::Unreachable("TypeError: could not connect to the origin".into()),
            ),
            (
                Err("DNS lookup failed"),
                SkipReason::Unreachable("DNS lookup failed".into()),
            ),
            (Ok(page(521)), SkipReason::OriginUnreachable(521)),
            (Ok(page(522)), SkipReason::OriginUnreachable(522)),
            (Ok(page(523)), SkipReason::OriginUnreachable(523)),
            (Ok(page(530)), SkipReason::OriginUnreachable(530)),
            (Ok(not_started(503, LOADING)), SkipReason::NotStarted(503)),
            (Ok(not_started(500, "{}")), SkipReason::NotStarted(500)),
            // The header decides, whatever the body: a 503 without an envelope too.
            (
                Ok(resp(503, &[(NOT_STARTED_HEADER, "1")], "")),
                SkipReason::NotStarted(503),
            ),
            (Ok(not_started(429, BUSY)), SkipReason::Busy),
            (Ok(node(429, BUSY)), SkipReason::Busy),
        ] {
            let mut s = Script::new(&[("eu", down.clone()), ("us", Ok(node(200, "ok")))]);
            let (region, response, skipped) = answered(&mut s);
            assert_eq!((region.as_str(), response.body.as_str()), ("us", "ok"));
            assert_eq!(
                skipped,
                [Skipped {
                    node: "eu".into(),
                    reason
                }],
                "{down:?}"
            );
            assert_eq!(s.sent, ["eu", "us"]);
        }
    }

    #[test]
    fn the_header_saves_reading_a_busy_body() {
        let mut s = Script::new(&[
            ("eu", Ok(not_started(429, BUSY))),
            ("us", Ok(node(200, ""))),
        ]);
        answered(&mut s);
        assert_eq!(s.peeked, 0);
        let mut s = Script::new(&[("eu", Ok(node(429, BUSY))), ("us", Ok(node(200, "")))]);
        answered(&mut s);
        assert_eq!(s.peeked, 1, "a 429 without the header is read for its code");
    }

    /// Answers that may come after the node started generating: never sent to another region.
    #[test]
    fn what_may_have_started_is_never_retried() {
        // The node's own errors reach the caller as they are, body intact.
        for answer in [
            node(503, LOADING), // a 503 without the header
            node(502, "{}"),
            node(504, "{}"),
            node(500, "{}"),
            node(429, RATE),
            node(400, "bad"),
            node(401, "auth"),
            node(403, "access"),
            node(404, ""),
            node(413, "too large"),
            // a header with another value is not the mark
            resp(
                503,
                &[
                    ("content-type", "application/json"),
                    (NOT_STARTED_HEADER, "0"),
                ],
                "{}",
            ),
        ] {
            let mut s = Script::new(&[("eu", Ok(answer.clone())), ("us", Ok(node(200, "ok")))]);
            let (region, response, skipped) = answered(&mut s);
            assert_eq!((region.as_str(), &response), ("eu", &answer));
            assert!(skipped.is_empty());
            assert_eq!(s.sent, ["eu"], "{answer:?}");
        }
        // Cloudflare's and cloudflared's pages become the Worker's 502, still without a retry.
        for status in [502, 503, 504, 520, 524, 500, 403, 429] {
            let mut s = Script::new(&[("eu", Ok(page(status))), ("us", Ok(node(200, "ok")))]);
            let (region, failure, skipped) = failed(&mut s);
            assert_eq!(
                (region.as_str(), failure),
                ("eu", Failure::NotTheNode(status))
            );
            assert!(skipped.is_empty());
            assert_eq!(s.sent, ["eu"], "{status}");
        }
        // A connection lost, reset or timed out: possibly after the request was sent.
        for lost in [
            WORKERD_LOST,
            "connection reset by peer",
            "internal error; reference = 0123abcd",
            "The operation timed out",
            "",
        ] {
            let mut s = Script::new(&[("eu", Err(lost)), ("us", Ok(node(200, "ok")))]);
            let (region, failure, _) = failed(&mut s);
            assert_eq!(
                (region.as_str(), failure),
                ("eu", Failure::Lost(lost.into()))
            );
            assert_eq!(s.sent, ["eu"], "{lost:?}");
        }
        // A 429 whose body could not be read: whether it was "busy" is unknown.
        let mut s = Script::new(&[("eu", Ok(node(429, BUSY))), ("us", Ok(node(200, "ok")))]);
        s.peek_fails = true;
        let (_, failure, _) = failed(&mut s);
        assert_eq!(failure, Failure::Lost(WORKERD_LOST.into()));
        assert_eq!(s.sent, ["eu"]);
    }

    #[test]
    fn a_retry_after_a_skip_can_still_fail_without_another() {
        let mut s = Script::new(&[
            ("eu", Ok(page(530))),
            ("us", Err(WORKERD_LOST)),
            ("ap", Ok(node(200, "ok"))),
        ]);
        let (region, failure, skipped) = failed(&mut s);
        assert_eq!(
            (region.as_str(), failure),
            ("us", Failure::Lost(WORKERD_LOST.into()))
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(s.sent, ["eu", "us"]);
    }

    #[test]
    fn redirects_are_accesss_refusal_and_never_reach_the_caller() {
        for status in [301, 302, 303, 307, 308, 300, 304] {
            let login = resp(
                status,
                &[(
                    "location",
                    "https://team.cloudflareaccess.com/cdn-cgi/access/login",
                )],
                "",
            );
            let mut s = Script::new(&[("eu", Ok(login)), ("us", Ok(node(200, "ok")))]);
            let (region, failure, _) = failed(&mut s);
            assert_eq!(
                (region.as_str(), &failure),
                ("eu", &Failure::AccessRejected(status))
            );
            assert_eq!(s.sent, ["eu"]);
            let e = failure.api_error("eu");
            assert_eq!((e.status, e.code), (502, 3000));
            assert!(
                e.message
                    .contains("Access in front of region eu rejected the Worker's credentials"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn failures_are_502s_in_the_envelope_without_the_runtimes_text() {
        for failure in [
            Failure::Lost("connect to 10.1.2.3:443 failed: secret detail".into()),
            Failure::NotTheNode(524),
            Failure::AccessRejected(302),
        ] {
            let e = failure.api_error("us");
            assert_eq!((e.status, e.code), (502, BAD_GATEWAY_CODE));
            assert!(e.message.starts_with("Bad gateway: "), "{}", e.message);
            assert!(e.message.contains("region us"), "{}", e.message);
            assert!(!e.message.contains("secret detail"));
            assert_eq!(e.retry_after(), None);
        }
        assert!(Failure::NotTheNode(524)
            .api_error("us")
            .message
            .contains("answered 524"));
        // Access answering 403 itself (no redirect configured) names the secrets too.
        let e = Failure::NotTheNode(403).api_error("eu");
        assert!(e.message.contains("ACCESS_CLIENT_SECRET"), "{}", e.message);
    }

    #[test]
    fn connect_failures_are_told_from_lost_connections() {
        for connect in [
            "connect(): Connection refused",
            "ECONNREFUSED 127.0.0.1:1",
            "Could not connect to the origin",
            "failed to connect",
            "No route to host",
            "Network unreachable",
            "DNS lookup failed",
            "getaddrinfo ENOTFOUND eu.example.com",
            "could not resolve host",
        ] {
            assert!(is_connect_failure(connect), "{connect}");
        }
        for maybe_sent in [
            WORKERD_LOST,
            "Network connection lost",
            "connection reset by peer",
            "broken pipe",
            "internal error; reference = 9abc",
            "The script will never generate a response.",
            "timed out",
            "",
        ] {
            assert!(!is_connect_failure(maybe_sent), "{maybe_sent}");
        }
    }

    #[test]
    fn every_region_skipped_is_a_503_naming_each() {
        let mut s = Script::new(&[
            ("eu", Err("connection refused")),
            ("us", Ok(page(530))),
            ("ap", Ok(not_started(503, LOADING))),
        ]);
        let Forwarded::NoRegion(skipped) = run(&mut s) else {
            panic!()
        };
        assert_eq!(s.sent, ["eu", "us", "ap"]);
        let e = no_region_error(&skipped);
        assert_eq!((e.status, e.code), (503, 3040));
        assert_eq!(
            e.message,
            "No edgerun node is available: eu: unreachable; us: answered 530; ap: answered 503"
        );
        assert_eq!(
            no_region_error(&[]).message,
            "No edgerun node is available: none configured"
        );
    }

    #[test]
    fn all_busy_or_some_busy_is_a_429() {
        let mut s = Script::new(&[
            ("eu", Ok(node(429, BUSY))),
            ("us", Err("connection refused")),
            ("ap", Ok(not_started(429, BUSY))),
        ]);
        let Forwarded::NoRegion(skipped) = run(&mut s) else {
            panic!()
        };
        assert_eq!(no_region_error(&skipped), ApiError::capacity());
    }

    #[test]
    fn content_types_are_read_like_the_nodes() {
        for json in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
        ] {
            assert!(is_json(Some(json)), "{json}");
        }
        for other in [
            "text/html",
            "application/jsonx",
            "text/plain; application/json",
            "",
        ] {
            assert!(!is_json(Some(other)), "{other}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn capacity_bodies_are_recognised() {
        assert!(is_capacity_error(BUSY.as_bytes()));
        assert!(is_capacity_error(ApiError::capacity().to_json().as_bytes()));
        assert!(!is_capacity_error(RATE.as_bytes()));
        let binding_style = edgerun_protocol::binding::error_body(&ApiError::capacity());
        assert!(is_capacity_error(binding_style.as_bytes()));
        assert!(!is_capacity_error(b""));
        assert!(!is_capacity_error(b"{\"errors\":3040}"));
    }
}
