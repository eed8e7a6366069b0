//! The connection's socket as hyper sees it ([`Watched`]): every byte read or written feeds the
//! watchdog's clocks ([`super::Activity`]), a blocked write starts the write-stall clock, and the
//! first bytes of each request head are kept so that an error hyper raises before any route
//! runs (a bare 400/414/431) is rewritten into the body of the route its request line names.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use edgerun_protocol::{ApiError, ErrorStyle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Activity;

/// The socket, reporting each read to the watchdog, and putting hyper's own error answers
/// (a malformed request head is answered by hyper before any service sees it, with an empty
/// body) into an error body like every other answer of the node, in the style of the route the
/// refused request was for ([`ErrorStyle::of_path`] of the path its request line names, when
/// its first bytes show one; Cloudflare's envelope otherwise): a `/v1/models/<64 KiB id>`
/// (414) or a control character in a `/v1` request's header (400) gets OpenAI's shape, a
/// binding request the binding's.
pub(super) struct Watched {
    pub(super) io: TcpStream,
    pub(super) activity: Arc<Activity>,
    /// An envelope answer written in place of hyper's bare one, and how much of it is written.
    pub(super) replacing: Option<(Vec<u8>, usize)>,
    /// Response heads written so far: one more than the service calls means hyper's own.
    pub(super) heads: u64,
    /// The first bytes of the request head being read (at most [`HEAD_PREFIX`]): where its
    /// request line names the path.
    pub(super) head: Vec<u8>,
    /// Service calls made when `head` began: a later one means `head` is an answered request's.
    pub(super) head_after: u64,
}

/// Bytes of a request head kept to tell its route when hyper refuses it (the request line up
/// to the path's first segments is enough: `POST /client/v4/accounts/<32 hex>/ai/v1/`).
pub(super) const HEAD_PREFIX: usize = 256;

/// The path a request head's first bytes name (`GET /v1/models/x?y HTTP/1.1` → `/v1/models/x`;
/// an absolute-form target's path too), or `None` when they do not look like a request line.
/// The path may be cut short (a head longer than what was kept): the route family is in its
/// first segments.
pub(super) fn path_of_head(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r' || b == b'\n').next()?;
    let space = line.iter().position(|&b| b == b' ')?;
    let (method, rest) = line.split_at(space);
    if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
        return None;
    }
    let target = &rest[1..];
    let end = target
        .iter()
        .position(|&b| b == b' ' || b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let target = std::str::from_utf8(&target[..end]).ok()?;
    let path = match target.split_once("://") {
        Some((_, after)) => &after[after.find('/')?..],
        None => target,
    };
    path.starts_with('/').then_some(path)
}

/// The style of the error body for a request whose head began with `head`.
pub(super) fn style_of_head(head: &[u8]) -> ErrorStyle {
    path_of_head(head).map_or(ErrorStyle::Cloudflare, ErrorStyle::of_path)
}

/// The error-body form of a bare error answer hyper wrote itself (`HTTP/1.1 400 Bad Request`,
/// `414`, `431`, ...), its body in `style`, or `None` when `head` is not one.
pub(super) fn envelope_for_bare_error(head: &[u8], style: ErrorStyle) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head.get(..head.len().min(512))?).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let lower = text.to_ascii_lowercase();
    if !(400..600).contains(&status) || !lower.contains("content-length: 0\r\n") {
        return None;
    }
    let reason = rest.get(4..)?.split("\r\n").next().unwrap_or("");
    let error = match status {
        400 => ApiError::bad_input("malformed HTTP request"),
        408 => ApiError::timeout(),
        413 | 431 => ApiError::new(status, 3006, format!("Request is too large: {reason}")),
        _ => ApiError::new(status, 3000, format!("HTTP error: {reason}")),
    };
    let body = style.body(&error);
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}: {}\r\n\
             connection: close\r\n\r\n{body}",
            edgerun_protocol::JSON_CONTENT_TYPE,
            body.len(),
            edgerun_protocol::REQUEST_ID_HEADER,
            crate::routes::new_request_id(),
        )
        .into_bytes(),
    )
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
            let this = &mut *self;
            this.keep_head(&buf.filled()[before..]);
        }
        polled
    }
}

impl Watched {
    /// Keeps the first bytes of a request head (read while no request is in flight) for
    /// [`style_of_head`].
    fn keep_head(&mut self, read: &[u8]) {
        if self.activity.in_flight.load(Ordering::Relaxed) > 0 {
            return;
        }
        let services = self.activity.services.load(Ordering::Relaxed);
        if services != self.head_after {
            self.head.clear();
            self.head_after = services;
        }
        let room = HEAD_PREFIX.saturating_sub(self.head.len());
        self.head.extend_from_slice(&read[..read.len().min(room)]);
    }

    /// Before writing `first` (the first bytes of a write): if it is a response head hyper
    /// wrote with no service call behind it, and a bare error, start replacing it.
    fn check_head(&mut self, first: &[u8]) {
        if self.replacing.is_none()
            && first.starts_with(b"HTTP/1.1 ")
            && self.heads >= self.activity.services.load(Ordering::Relaxed)
        {
            if let Some(answer) = envelope_for_bare_error(first, style_of_head(&self.head)) {
                self.replacing = Some((answer, 0));
            }
        }
    }

    /// Counts a head once its write has made progress (a write that returned `Pending` is
    /// retried with the same bytes, and must not count twice).
    fn wrote_some(&mut self, first: &[u8], polled: &Poll<std::io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) && first.starts_with(b"HTTP/1.1 ") {
            self.heads += 1;
        }
        self.activity.wrote(!polled.is_pending());
    }

    /// Writes the replacement answer; `Ok(stands_for)` once all of it is out.
    fn poll_replacement(
        &mut self,
        cx: &mut Context<'_>,
        stands_for: usize,
    ) -> Poll<std::io::Result<usize>> {
        let Some((answer, written)) = &mut self.replacing else {
            return Poll::Ready(Ok(0));
        };
        while *written < answer.len() {
            match Pin::new(&mut self.io).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(n)) => {
                    *written += n;
                    self.activity.wrote(true);
                }
                Poll::Pending => {
                    self.activity.wrote(false);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        // Replaced whole; what hyper writes next goes out as it is.
        self.replacing = None;
        self.heads += 1;
        Poll::Ready(Ok(stands_for))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.check_head(buf);
        if this.replacing.is_some() {
            return this.poll_replacement(cx, buf.len());
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote_some(buf, &polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Vectored writes stay on: with them hyper queues at most 16 body chunks before it stops
    /// polling a stream, instead of flattening up to 400 KiB into its own buffer.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let first: &[u8] = bufs.iter().find(|b| !b.is_empty()).map_or(&[], |b| b);
        this.check_head(first);
        if this.replacing.is_some() {
            let total = bufs.iter().map(|b| b.len()).sum();
            return this.poll_replacement(cx, total);
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote_some(first, &polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
