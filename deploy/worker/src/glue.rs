//! The wasm glue: the `fetch` event handler. It reads the request and the environment, calls the
//! host-tested core (`edge`, `config`, `forward`, `failover`) and turns the chosen node's
//! response into the caller's. Nothing here decides anything the core could.

use crate::balance::{Balancer, Node};
use crate::config::{parse_body_limit, Location, NodesConfig};
use crate::edge::{admit, authenticate, check_body, LimitedBody, RequestHead};
use crate::failover::{forward, no_region_error, Forwarded, SkipReason, Upstream, MAX_PEEK_BYTES};
use crate::forward::{
    keep_response_header, request_id, upstream_headers, upstream_url, NodeCredentials, NODE_HEADER,
    REGION_HEADER, REQUEST_ID_HEADER,
};
use crate::{error_response_parts, EdgeError, WorkerError};
use edgerun_protocol::{binding, session_of, ApiError, ErrorStyle, NodeLoad, TokenSet};
use futures_util::StreamExt;
use std::cell::RefCell;
use worker::js_sys::{self, Reflect, Uint8Array};
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::{
    event, Context, Env, Fetch, Headers, Method, Request, RequestInit, RequestRedirect, Response,
};

#[event(fetch)]
async fn fetch(mut req: Request, env: Env, _ctx: Context) -> worker::Result<Response> {
    let id = request_id(
        req.headers()
            .get(REQUEST_ID_HEADER)
            .ok()
            .flatten()
            .as_deref(),
        random_uuid,
    );
    // The Worker's own answers take the shape of the route family the caller called.
    let style = req
        .url()
        .map(|url| ErrorStyle::of_path(url.path()))
        .unwrap_or(ErrorStyle::Cloudflare);
    let answer = match handle(&mut req, &env, &id).await {
        Ok((response, by)) => Ok((response, Some(by))),
        Err(e) => error_response(&e, style).map(|response| {
            let by = e.region.map(|region| AnsweredBy { region, node: None });
            (response, by)
        }),
    };
    let finished = answer.and_then(|(response, by)| finish(response, &id, by.as_ref()));
    finished.or_else(|e| {
        // Only the runtime's header and body calls can fail here; the caller still gets the
        // envelope, never workerd's own plain-text 500.
        worker::console_error!("{id}: could not build the answer: {e}");
        let e = EdgeError::from(ApiError::internal("the Worker could not build its answer"));
        finish(error_response(&e, style)?, &id, None)
    })
}

thread_local! {
    /// What this isolate knows of the nodes' load and failures (an isolate runs one thread).
    static BALANCER: RefCell<Balancer> = RefCell::new(Balancer::default());
    /// The rotation among equally loaded nodes: advances with every request, from a random
    /// start per isolate, so one isolate's requests take turns and isolates do not all start
    /// on the same node.
    static TURN: std::cell::Cell<u64> =
        std::cell::Cell::new((js_sys::Math::random() * 4_294_967_296.0) as u64);
}

/// Which region and node answered, for `x-edgerun-region` and `x-edgerun-node`.
struct AnsweredBy {
    region: String,
    node: Option<String>,
}

/// Admits, validates and forwards one request; `Err` is answered by the Worker itself.
async fn handle(
    req: &mut Request,
    env: &Env,
    id: &str,
) -> Result<(Response, AnsweredBy), EdgeError> {
    let headers = header_pairs(req.headers());
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    // The caller first: nothing of the configuration reaches an unauthenticated caller.
    let tokens = TokenSet::parse_list(&secret(env, "API_TOKENS").unwrap_or_default());
    authenticate(header("authorization"), &tokens)?;

    let nodes = NodesConfig::parse(&var(env, "NODES").unwrap_or_default())?;
    let body_limit = parse_body_limit(var(env, "MAX_BODY_BYTES").as_deref())?;
    // The method as sent: workers-rs maps methods it does not know to GET.
    let method = req.inner().method();
    let url = req.url().map_err(|e| WorkerError::Runtime(e.to_string()))?;
    let path_and_query = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let head = RequestHead {
        method: &method,
        path: url.path(),
        query: url.query(),
        content_length: header("content-length").and_then(|v| v.trim().parse().ok()),
        binding_model: header(binding::MODEL_HEADER),
    };
    let admitted = admit(&head, &nodes, body_limit)?;

    let body = if method == "GET" || method == "HEAD" {
        None
    } else {
        Some(read_body(req, body_limit).await?)
    };
    let body_model = check_body(
        &admitted,
        body.as_deref().unwrap_or_default(),
        &nodes,
        body_limit,
    )?;

    // Only the regions that serve the model asked for (NODES' per-region `models`).
    let model = admitted.model().map(str::to_string).or(body_model);
    let regions = nodes.regions_for_model(&location(req), model.as_deref());
    // Every region's credentials before the first fetch: a missing secret is a 500 naming it.
    let credentials = regions
        .iter()
        .map(|r| {
            NodeCredentials::for_region(r, |name| secret(env, name)).map(|c| (r.name.clone(), c))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let session = session_of(header(edgerun_protocol::SESSION_AFFINITY_HEADER));
    let spread = TURN.with(|t| {
        let turn = t.get();
        t.set(turn.wrapping_add(1));
        turn
    });
    let nodes = BALANCER.with(|b| {
        b.borrow()
            .plan(&regions, session, js_sys::Date::now(), spread)
    });
    let mut upstream = FetchUpstream {
        credentials,
        method,
        path_and_query,
        headers,
        body,
        request_id: id,
        node_token: admitted.sends_node_token(),
    };
    let forwarded = forward(&mut upstream, &nodes).await;
    let node_of = |label: &str| nodes.iter().find(|n| n.label() == label).copied();
    let now = js_sys::Date::now();
    let skipped = match &forwarded {
        Forwarded::Answered { skipped, .. }
        | Forwarded::Failed { skipped, .. }
        | Forwarded::NoRegion(skipped) => skipped,
    };
    BALANCER.with(|b| {
        let mut b = b.borrow_mut();
        for s in skipped {
            if let Some(node) = node_of(&s.node) {
                match s.reason {
                    SkipReason::Busy => b.busy(node.origin(), now),
                    _ => b.failed(node.origin(), now),
                }
            }
        }
        match &forwarded {
            Forwarded::Answered { node, response, .. } => {
                if let Some(n) = node_of(node) {
                    let load = response
                        .headers()
                        .get(edgerun_protocol::LOAD_HEADER)
                        .ok()
                        .flatten()
                        .and_then(|v| NodeLoad::parse(&v));
                    b.answered(n.origin(), load, now);
                }
            }
            Forwarded::Failed { node, .. } => {
                if let Some(n) = node_of(node) {
                    b.failed(n.origin(), now);
                }
            }
            Forwarded::NoRegion(_) => {}
        }
    });
    match forwarded {
        Forwarded::Answered {
            node,
            response,
            skipped,
        } => {
            if !skipped.is_empty() {
                worker::console_warn!("{id}: answered by {node} after skipping {skipped:?}");
            }
            let region = node_of(&node).map_or_else(|| node.clone(), |n| n.region.name.clone());
            Ok((
                response,
                AnsweredBy {
                    region,
                    node: Some(node),
                },
            ))
        }
        Forwarded::Failed {
            node,
            failure,
            skipped,
        } => {
            // Not retried: the node may have started the request (see failover's docs). Its
            // next requests go elsewhere for a while (`balance`).
            worker::console_error!(
                "{id}: node {node} failed, not retried: {failure:?} (skipped before: {skipped:?})"
            );
            let region = node_of(&node).map_or_else(|| node.clone(), |n| n.region.name.clone());
            Err(EdgeError::from_region(failure.api_error(&node), &region))
        }
        Forwarded::NoRegion(skipped) => {
            worker::console_error!("{id}: no region answered: {skipped:?}");
            Err(no_region_error(&skipped).into())
        }
    }
}

/// Sends the request with `fetch` to one node.
struct FetchUpstream<'a> {
    /// Each region's name and credentials.
    credentials: Vec<(String, NodeCredentials)>,
    method: String,
    path_and_query: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    request_id: &'a str,
    /// Whether the node's bearer token goes along (every API route; not `/health`).
    node_token: bool,
}

/// What `send` reports for a node that failed its health probe: the request was never sent, so
/// failover moves on as for a connection that could not be made.
const PROBE_FAILED: &str = "could not connect: the node failed its health probe";

impl FetchUpstream<'_> {
    /// Asks a node that failed before whether it is ready again (`GET /health`, 200), with
    /// the Access service token and without the node token, which `/health` does not need.
    async fn healthy(&self, node: &Node<'_>, credentials: &NodeCredentials) -> bool {
        let headers = Headers::new();
        for (name, value) in upstream_headers(&[], credentials, self.request_id, false) {
            if headers.append(&name, &value).is_err() {
                return false;
            }
        }
        let mut init = RequestInit::new();
        init.with_method(Method::Get)
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual);
        let Ok(request) = Request::new_with_init(&upstream_url(node.origin(), "/health"), &init)
        else {
            return false;
        };
        match Fetch::Request(request).send().await {
            Ok(response) => response.status_code() == 200,
            Err(_) => false,
        }
    }
}

impl Upstream for FetchUpstream<'_> {
    type Response = Response;

    async fn send(&mut self, node: &Node<'_>) -> Result<Response, String> {
        let region = node.region;
        let credentials = self
            .credentials
            .iter()
            .find_map(|(name, c)| (*name == region.name).then_some(c))
            .ok_or_else(|| format!("no credentials for region {}", region.name))?;
        let probe = BALANCER.with(|b| b.borrow().needs_probe(node.origin(), js_sys::Date::now()));
        if probe && !self.healthy(node, credentials).await {
            return Err(PROBE_FAILED.into());
        }
        BALANCER.with(|b| b.borrow_mut().sent(node.origin()));
        let headers = Headers::new();
        for (name, value) in
            upstream_headers(&self.headers, credentials, self.request_id, self.node_token)
        {
            headers.append(&name, &value).map_err(|e| e.to_string())?;
        }
        let mut init = RequestInit::new();
        // A redirect (Access sending a refused service token to its login page) must be seen
        // (failover turns it into a 502), never followed with the node's credentials.
        init.with_method(Method::from(self.method.clone()))
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual);
        if let Some(body) = &self.body {
            init.with_body(Some(Uint8Array::from(body.as_slice()).into()));
        }
        let request =
            Request::new_with_init(&upstream_url(node.origin(), &self.path_and_query), &init)
                .map_err(|e| e.to_string())?;
        Fetch::Request(request)
            .send()
            .await
            .map_err(|e| e.to_string())
    }

    fn status(response: &Response) -> u16 {
        response.status_code()
    }

    fn header(response: &Response, name: &str) -> Option<String> {
        response.headers().get(name).ok().flatten()
    }

    async fn peek(&mut self, mut response: Response) -> Result<(Response, Vec<u8>), String> {
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        let peeked = body[..body.len().min(MAX_PEEK_BYTES)].to_vec();
        let rebuilt = Response::from_bytes(body)
            .map_err(|e| e.to_string())?
            .with_status(response.status_code())
            .with_headers(copy_headers(response.headers()));
        Ok((rebuilt, peeked))
    }
}

/// The caller's answer: the node's (or the Worker's own) response with the request id and the
/// answering region and node added, and cookies and Access headers removed. A fetched response's headers
/// are immutable, so they are copied; the body stays the same stream.
fn finish(response: Response, id: &str, by: Option<&AnsweredBy>) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in response.headers().entries() {
        if keep_response_header(&name) {
            headers.append(&name, &value)?;
        }
    }
    headers.set(REQUEST_ID_HEADER, id)?;
    if let Some(by) = by {
        headers.set(REGION_HEADER, &by.region)?;
        if let Some(node) = &by.node {
            headers.set(NODE_HEADER, node)?;
        }
    }
    Ok(response.with_headers(headers))
}

fn error_response(e: &EdgeError, style: ErrorStyle) -> worker::Result<Response> {
    let (status, headers, body) = error_response_parts(e, style);
    let h = Headers::new();
    for (name, value) in headers {
        h.set(name, &value)?;
    }
    Ok(Response::from_bytes(body.into_bytes())?
        .with_status(status)
        .with_headers(h))
}

fn copy_headers(from: &Headers) -> Headers {
    let to = Headers::new();
    for (name, value) in from.entries() {
        let _ = to.append(&name, &value);
    }
    to
}

/// Reads the request body chunk by chunk, refusing it once it passes the limit.
async fn read_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = LimitedBody::new(limit);
    let Ok(mut stream) = req.stream() else {
        return Ok(Vec::new()); // no body at all
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| WorkerError::Runtime(e.to_string()))?;
        body.push(&chunk)?;
    }
    Ok(body.into_bytes())
}

fn header_pairs(headers: &Headers) -> Vec<(String, String)> {
    headers.entries().collect()
}

/// `request.cf`'s colo, country and continent; read field by field because a local runtime has
/// no `cf` object and a real one may lack any field.
fn location(req: &Request) -> Location {
    let cf = Reflect::get(req.inner(), &JsValue::from_str("cf")).unwrap_or(JsValue::UNDEFINED);
    let field = |name: &str| {
        if !cf.is_object() {
            return None;
        }
        Reflect::get(&cf, &JsValue::from_str(name))
            .ok()
            .and_then(|v| v.as_string())
            .filter(|s| !s.is_empty())
    };
    Location {
        colo: field("colo"),
        country: field("country"),
        continent: field("continent"),
    }
}

/// A text binding, or a JSON one (wrangler.toml may give `NODES` as a table) serialised back.
fn var(env: &Env, name: &str) -> Option<String> {
    let value = Reflect::get(env, &JsValue::from_str(name)).ok()?;
    if let Some(text) = value.as_string() {
        return Some(text);
    }
    if let Some(number) = value.as_f64() {
        // `MAX_BODY_BYTES = 1048576` unquoted in wrangler.toml is a number binding.
        return Some(if number.fract() == 0.0 && number.abs() < 9.0e15 {
            format!("{}", number as i64)
        } else {
            number.to_string()
        });
    }
    if value.is_object() {
        return js_sys::JSON::stringify(&value).ok()?.as_string();
    }
    None
}

fn secret(env: &Env, name: &str) -> Option<String> {
    var(env, name).filter(|s| !s.is_empty())
}

/// `crypto.randomUUID()`, or a time-based id if the runtime lacks it.
fn random_uuid() -> String {
    let global = js_sys::global();
    Reflect::get(&global, &JsValue::from_str("crypto"))
        .ok()
        .and_then(|crypto| {
            let f = Reflect::get(&crypto, &JsValue::from_str("randomUUID")).ok()?;
            let f = f.dyn_into::<js_sys::Function>().ok()?;
            f.call0(&crypto).ok()?.as_string()
        })
        .unwrap_or_else(|| format!("{:x}", js_sys::Date::now() as u64))
}
