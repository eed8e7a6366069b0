//! The two HTTP layers taken from tower-http rather than written here: request tracing
//! ([`trace`]) and CORS for browser clients ([`CorsOrigins`], off unless `--cors-origin` names
//! who may call).
//!
//! Tracing: every request gets a `request` span (method, path, the request id the
//! `request_id` middleware chose), with a `started` event and an `answered` event (status,
//! milliseconds to the response head) and, for a streamed body, `stream ended` (milliseconds
//! the body took). All at debug level and with this crate's target, so
//! `EDGERUN_LOG=edgerun=debug` shows them beside the engine's `admitted`/`step`/`left the batch`
//! records, and the default `info` costs nothing but a disabled-span check.
//!
//! CORS: without `--cors-origin` no CORS headers are sent and browsers refuse cross-origin
//! calls (what a node behind the edge Worker wants). With it, preflights are answered here,
//! before the Access and bearer checks (a preflight carries no credentials), for `GET` and
//! `POST`, any request header the browser asks for (the OpenAI SDKs send `x-stainless-*`), and
//! the request id and `Retry-After` exposed to scripts. Credentials mode is not allowed: the
//! bearer token is a header, not a cookie.

use crate::routes::RequestId;
use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, Response, Uri};
use std::time::Duration;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::trace::{HttpMakeClassifier, TraceLayer};
use tracing::Span;

/// Who may call the node from a browser: `--cors-origin` / `EDGERUN_CORS_ORIGIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any page may call (the bearer token is still required).
    Any,
    /// Exact origins, `scheme://host[:port]`, as a browser sends them in `Origin`.
    List(Vec<HeaderValue>),
}

impl CorsOrigins {
    /// Reads the flag's values; `Ok(None)` when none were given (CORS off). Refuses what a
    /// browser could never send as an `Origin` (a path, a trailing slash, upper case, another
    /// scheme), and `*` beside named origins, rather than serving a policy that matches nothing.
    pub fn parse(values: &[String]) -> Result<Option<Self>, String> {
        if values.is_empty() {
            return Ok(None);
        }
        if values.iter().any(|v| v == "*") {
            if values.len() > 1 {
                return Err("--cors-origin: `*` allows every origin; give it alone".into());
            }
            return Ok(Some(Self::Any));
        }
        let mut origins = Vec::with_capacity(values.len());
        for v in values {
            origins.push(parse_origin(v).map_err(|why| format!("--cors-origin {v:?}: {why}"))?);
        }
        Ok(Some(Self::List(origins)))
    }

    pub fn layer(&self) -> CorsLayer {
        let origin = match self {
            Self::Any => AllowOrigin::any(),
            Self::List(list) => AllowOrigin::list(list.iter().cloned()),
        };
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                HeaderName::from_static(edgerun_protocol::REQUEST_ID_HEADER),
                header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600))
    }
}

fn parse_origin(v: &str) -> Result<HeaderValue, &'static str> {
    let uri: Uri = v
        .parse()
        .map_err(|_| "not an origin; write it as scheme://host[:port]")?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err("not an origin; write it as scheme://host[:port]");
    };
    if scheme != "http" && scheme != "https" {
        return Err("the scheme must be http or https");
    }
    if authority.as_str().contains('@') {
        return Err("an origin has no user name");
    }
    if v != format!("{scheme}://{authority}") {
        return Err("an origin has no path, query or trailing slash");
    }
    if v.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("browsers send origins in lower case; write it so");
    }
    HeaderValue::from_str(v).map_err(|_| "not a valid header value")
}

/// The request span and its events (see the module docs).
#[allow(clippy::type_complexity)]
pub fn trace() -> TraceLayer<
    HttpMakeClassifier,
    fn(&Request<Body>) -> Span,
    fn(&Request<Body>, &Span),
    fn(&Response<Body>, Duration, &Span),
    (),
    fn(Option<&axum::http::HeaderMap>, Duration, &Span),
    fn(ServerErrorsFailureClass, Duration, &Span),
> {
    TraceLayer::new_for_http()
        .make_span_with(request_span as fn(&Request<Body>) -> Span)
        .on_request(on_request as fn(&Request<Body>, &Span))
        .on_response(on_response as fn(&Response<Body>, Duration, &Span))
        .on_body_chunk(())
        .on_eos(on_eos as fn(Option<&axum::http::HeaderMap>, Duration, &Span))
        .on_failure(on_failure as fn(ServerErrorsFailureClass, Duration, &Span))
}

fn request_span(req: &Request<Body>) -> Span {
    let id = req.extensions().get::<RequestId>().map(|id| id.0.as_str());
    tracing::debug_span!(
        "request",
        method = %req.method(),
        path = req.uri().path(),
        id = id.unwrap_or(""),
    )
}

fn on_request(_: &Request<Body>, _: &Span) {
    tracing::debug!("started");
}

fn on_response(resp: &Response<Body>, latency: Duration, _: &Span) {
    tracing::debug!(
        status = resp.status().as_u16(),
        ms = latency.as_secs_f64() * 1e3,
        "answered"
    );
}

fn on_eos(_: Option<&axum::http::HeaderMap>, stream: Duration, _: &Span) {
    tracing::debug!(ms = stream.as_secs_f64() * 1e3, "stream ended");
}

fn on_failure(class: ServerErrorsFailureClass, latency: Duration, _: &Span) {
    tracing::debug!(%class, ms = latency.as_secs_f64() * 1e3, "failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Option<CorsOrigins>, String> {
        CorsOrigins::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn origins_parse_strictly() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["*"]).unwrap(), Some(CorsOrigins::Any));
        assert_eq!(
            parse(&["https://app.example.com", "http://localhost:5173"]).unwrap(),
            Some(CorsOrigins::List(vec![
                HeaderValue::from_static("https://app.example.com"),
                HeaderValue::from_static("http://localhost:5173"),
            ]))
        );
        for (bad, why) in [
            ("https://app.example.com/", "no path"),
            ("https://app.example.com/chat", "no path"),
            ("https://app.example.com?x=1", "no path"),
            ("app.example.com", "scheme://host"),
            ("ftp://app.example.com", "http or https"),
            ("https://App.example.com", "lower case"),
            ("https://user@app.example.com", "user name"),
            ("", "scheme://host"),
        ] {
            let err = parse(&[bad]).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(parse(&["*", "https://a.example"])
            .unwrap_err()
            .contains("alone"));
    }
}
