//! The wasm glue: the `fetch` event handler. It reads the request and the environment, calls the
//! host-tested core (`edge`, `config`, `forward`, `failover`) and turns the chosen node's
//! response into the caller's. Nothing here decides anything the core could.

use crate::config::{parse_body_limit, Location, NodesConfig, Region};
use crate::edge::{admit, authenticate, check_body, LimitedBody, RequestHead};
use crate::failover::{forward, no_region_error, Forwarded, Upstream, MAX_PEEK_BYTES};
use crate::forward::{
    keep_response_header, request_id, upstream_headers, upstream_url, NodeCredentials,
    REGION_HEADER, REQUEST_ID_HEADER,
};
use crate::{error_response_parts, EdgeError, WorkerError};
use edgerun_protocol::{binding, ApiError, ErrorStyle, TokenSet};
use futures_util::StreamExt;
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
        Ok((response, region)) => Ok((response, Some(region))),
        Err(e) => error_response(&e, style).map(|response| (response, e.region)),
    };
    let finished = answer.and_then(|(response, region)| finish(response, &id, region.as_deref()));
    finished.or_else(|e| {
        // Only the runtime's header and body calls can fail here; the caller still gets the
        // envelope, never workerd's own plain-text 500.
        worker::console_error!("{id}: could not build the answer: {e}");
        let e = EdgeError::from(ApiError::internal("the Worker could not build its answer"));
        finish(error_response(&e, style)?, &id, None)
    })
}

/// Admits, validates and forwards one request; `Err` is answered by the Worker itself.
async fn handle(req: &mut Request, env: &Env, id: &str) -> Result<(Response, String), EdgeError> {
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
    check_body(
        &admitted,
        body.as_deref().unwrap_or_default(),
        &nodes,
        body_limit,
    )?;

    let regions = nodes.regions_for(&location(req));
    // Every region's credentials before the first fetch: a missing secret is a 500 naming it.
    let credentials = regions
        .iter()
        .map(|r| {
            NodeCredentials::for_region(r, |name| secret(env, name)).map(|c| (r.name.clone(), c))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut upstream = FetchUpstream {
        credentials,
        method,
        path_and_query,
        headers,
        body,
        request_id: id,
        node_token: admitted.sends_node_token(),
    };
    match forward(&mut upstream, &regions).await {
        Forwarded::Answered {
            region,
            response,
            skipped,
        } => {
            if !skipped.is_empty() {
                worker::console_warn!("{id}: answered by {region} after skipping {skipped:?}");
            }
            Ok((response, region))
        }
        Forwarded::Failed {
            region,
            failure,
            skipped,
        } => {
            // Not retried: the node may have started the request (see failover's docs).
            worker::console_error!(
                "{id}: region {region} failed, not retried: {failure:?} (skipped before: {skipped:?})"
            );
            Err(EdgeError::from_region(failure.api_error(&region), &region))
        }
        Forwarded::NoRegion(skipped) => {
            worker::console_error!("{id}: no region answered: {skipped:?}");
            Err(no_region_error(&skipped).into())
        }
    }
}

/// Sends the request with `fetch` to one region's origin.
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

impl Upstream for FetchUpstream<'_> {
    type Response = Response;

    async fn send(&mut self, region: &Region) -> Result<Response, String> {
        let credentials = self
            .credentials
            .iter()
            .find_map(|(name, c)| (*name == region.name).then_some(c))
            .ok_or_else(|| format!("no credentials for region {}", region.name))?;
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
        let request = Request::new_with_init(&upstream_url(region, &self.path_and_query), &init)
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
/// answering region added, and cookies and Access headers removed. A fetched response's headers
/// are immutable, so they are copied; the body stays the same stream.
fn finish(response: Response, id: &str, region: Option<&str>) -> worker::Result<Response> {
    let headers = Headers::new();
    for (name, value) in response.headers().entries() {
        if keep_response_header(&name) {
            headers.append(&name, &value)?;
        }
    }
    headers.set(REQUEST_ID_HEADER, id)?;
    if let Some(region) = region {
        headers.set(REGION_HEADER, region)?;
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
