//! Server-sent events in the native `/ai/run` framing (reference §3.2).
//!
//! A stream is, in order: one [`token_event`] per generated piece of text,
//! one [`usage_event`], then [`DONE_EVENT`]. Each event is a single
//! `data: <json>\n\n`; there are no `event:`, `id:` or `retry:` fields. The
//! stream is never wrapped in the v4 envelope and is sent with
//! `Content-Type: text/event-stream`. [`heartbeat`] is an SSE comment a server
//! may send while idle; every SSE client ignores it. A failure after the first
//! byte was sent is reported in-band with [`error_event`] (Cloudflare has no
//! documented format for this; a silent close would look like a complete
//! answer), and the stream then ends without `[DONE]`.
//!
//! [`SseParser`] reads such streams back, incrementally, for tests and for
//! the Worker that proxies them.

use serde::Serialize;
use serde_json::Value;

use crate::error::{ApiError, ErrorItem};
use crate::response::Usage;

/// The `Content-Type` of a streamed answer.
pub const EVENT_STREAM_CONTENT_TYPE: &str = "text/event-stream";

/// The last event of a successful stream.
pub const DONE_EVENT: &str = "data: [DONE]\n\n";

const HEARTBEAT: &str = ": keep-alive\n\n";

/// Frame sent if a frame could not be serialised (cannot happen for the
/// types used here; exists so that no path panics).
const FALLBACK_ERROR_EVENT: &str = "data: {\"error\":{\"code\":3000,\"message\":\"AiError: Internal error: failed to serialize event\"},\"errors\":[{\"code\":3000,\"message\":\"AiError: Internal error: failed to serialize event\"}]}\n\n";

#[derive(Serialize)]
struct TokenChunk<'a> {
    response: &'a str,
}

#[derive(Serialize)]
struct UsageChunk<'a> {
    response: &'a str,
    usage: &'a Usage,
}

#[derive(Serialize)]
struct ErrorChunk<'a> {
    error: &'a ErrorItem,
    errors: [&'a ErrorItem; 1],
}

fn frame(payload: &impl Serialize) -> String {
    match serde_json::to_string(payload) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(_) => FALLBACK_ERROR_EVENT.to_owned(),
    }
}

/// `data: {"response":"<text>"}\n\n`, with JSON escaping (quotes, backslashes
/// and control characters such as newlines are escaped; other Unicode is sent
/// as UTF-8), so an event never spans more than one line.
pub fn token_event(text: &str) -> String {
    frame(&TokenChunk { response: text })
}

/// `data: {"response":"","usage":{"prompt_tokens":..,"completion_tokens":..,"total_tokens":..}}\n\n`
pub fn usage_event(usage: &Usage) -> String {
    frame(&UsageChunk {
        response: "",
        usage,
    })
}

/// `data: {"response":"","tool_calls":[{"name":..,"arguments":{..}},..]}\n\n`: the calls an
/// answer made, sent once before the usage event.
pub fn tool_calls_event(calls: &[serde_json::Value]) -> String {
    frame(&serde_json::json!({"response": "", "tool_calls": calls}))
}

/// `data: {"error":{"code":..,"message":..},"errors":[{"code":..,"message":..}]}\n\n`
///
/// For failures after the response headers went out. `error` suits
/// OpenAI-style clients, `errors` mirrors the v4 envelope.
pub fn error_event(err: &ApiError) -> String {
    let item = err.item();
    frame(&ErrorChunk {
        error: &item,
        errors: [&item],
    })
}

/// `: keep-alive\n\n`, an SSE comment that keeps idle connections open.
pub fn heartbeat() -> &'static str {
    HEARTBEAT
}

/// One event read back by [`SseParser`].
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// The JSON of a `data:` event; data that is not valid JSON comes back as
    /// `Value::String(raw)`.
    Data(Value),
    /// `data: [DONE]`.
    Done,
    /// A comment line (`: text`), without the colon and one leading space.
    Comment(String),
}

/// Incremental SSE reader.
///
/// Feed it the body in chunks of any size with [`SseParser::push`]; chunks
/// may split an event anywhere, including between `\r` and `\n` and inside a
/// multi-byte UTF-8 character. Lines may end in `\n`, `\r\n` or `\r`; an
/// event ends at an empty line. Multiple `data:` lines of one event are
/// joined with `\n`; `event:`, `id:`, `retry:` and unknown fields are
/// ignored. Bytes that are not UTF-8 are replaced with U+FFFD. A leading
/// byte order mark is skipped. Never panics.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next chunk
    /// belongs to that line end.
    skip_lf: bool,
    /// `data` of the event being read, if any `data:` line was seen.
    data: Option<String>,
    /// At least one line was completed (for byte order mark handling).
    seen_line: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consume `bytes`; return the events they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = bytes;
        if self.skip_lf {
            if let Some((&first, tail)) = rest.split_first() {
                self.skip_lf = false;
                if first == b'\n' {
                    rest = tail;
                }
            }
        }
        while let Some(i) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, tail) = rest.split_at(i);
            self.line.extend_from_slice(head);
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut events);
            // `tail` starts with the terminator.
            rest = match tail {
                [b'\r', b'\n', after @ ..] => after,
                [b'\r'] => {
                    self.skip_lf = true;
                    &[]
                }
                [_, after @ ..] => after,
                [] => &[],
            };
        }
        self.line.extend_from_slice(rest);
        events
    }

    /// End of stream: complete a final unterminated line and dispatch a
    /// pending event even without its closing blank line (lenient; the SSE
    /// specification would drop it). The parser is then ready for a new
    /// stream.
    pub fn finish(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut events);
        }
        self.dispatch(&mut events);
        *self = Self::default();
        events
    }

    fn process_line(&mut self, bytes: &[u8], events: &mut Vec<SseEvent>) {
        let decoded = String::from_utf8_lossy(bytes);
        let mut line: &str = &decoded;
        if !self.seen_line {
            self.seen_line = true;
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(events);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            events.push(SseEvent::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) {
        let Some(data) = self.data.take() else {
            return;
        };
        if data.trim() == "[DONE]" {
            events.push(SseEvent::Done);
            return;
        }
        events.push(match serde_json::from_str(&data) {
            Ok(value) => SseEvent::Data(value),
            Err(_) => SseEvent::Data(Value::String(data)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_events_are_byte_exact() {
        assert_eq!(token_event("Hello"), "data: {\"response\":\"Hello\"}\n\n");
        assert_eq!(token_event(""), "data: {\"response\":\"\"}\n\n");
        assert_eq!(
            token_event("say \"hi\"\nnow\\"),
            "data: {\"response\":\"say \\\"hi\\\"\\nnow\\\\\"}\n\n"
        );
        assert_eq!(
            token_event("\r\t\u{1}"),
            "data: {\"response\":\"\\r\\t\\u0001\"}\n\n"
        );
        assert_eq!(token_event("🦀 é"), "data: {\"response\":\"🦀 é\"}\n\n");
    }

    #[test]
    fn usage_event_is_byte_exact() {
        assert_eq!(
            usage_event(&Usage::new(755, 10)),
            "data: {\"response\":\"\",\"usage\":{\"prompt_tokens\":755,\"completion_tokens\":10,\"total_tokens\":765}}\n\n"
        );
    }

    #[test]
    fn error_event_is_byte_exact() {
        assert_eq!(
            error_event(&ApiError::internal("engine \"died\"")),
            "data: {\"error\":{\"code\":3000,\"message\":\"AiError: Internal error: engine \\\"died\\\"\"},\"errors\":[{\"code\":3000,\"message\":\"AiError: Internal error: engine \\\"died\\\"\"}]}\n\n"
        );
    }

    #[test]
    fn constants() {
        assert_eq!(DONE_EVENT, "data: [DONE]\n\n");
        assert_eq!(heartbeat(), ": keep-alive\n\n");
        assert_eq!(EVENT_STREAM_CONTENT_TYPE, "text/event-stream");
    }

    fn sample_stream() -> (String, Vec<SseEvent>) {
        let stream = [
            heartbeat().to_owned(),
            token_event("Hello"),
            token_event(" \"wörld\"\n🦀"),
            token_event(""),
            usage_event(&Usage::new(3, 4)),
            DONE_EVENT.to_owned(),
        ]
        .concat();
        let expected = vec![
            SseEvent::Comment("keep-alive".into()),
            SseEvent::Data(json!({"response": "Hello"})),
            SseEvent::Data(json!({"response": " \"wörld\"\n🦀"})),
            SseEvent::Data(json!({"response": ""})),
            SseEvent::Data(json!({"response": "", "usage": {
                "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})),
            SseEvent::Done,
        ];
        (stream, expected)
    }

    fn parse_split(bytes: &[u8], at: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = parser.push(&bytes[..at]);
        events.extend(parser.push(&bytes[at..]));
        events.extend(parser.finish());
        events
    }

    #[test]
    fn parses_whole_stream() {
        let (stream, expected) = sample_stream();
        let mut parser = SseParser::new();
        assert_eq!(parser.push(stream.as_bytes()), expected);
        assert_eq!(parser.finish(), vec![]);
    }

    #[test]
    fn every_split_point_lf() {
        let (stream, expected) = sample_stream();
        let bytes = stream.as_bytes();
        for at in 0..=bytes.len() {
            assert_eq!(parse_split(bytes, at), expected, "split at {at}");
        }
    }

    #[test]
    fn every_split_point_crlf() {
        let (stream, expected) = sample_stream();
        let crlf = stream.replace('\n', "\r\n");
        let bytes = crlf.as_bytes();
        for at in 0..=bytes.len() {
            assert_eq!(parse_split(bytes, at), expected, "split at {at}");
        }
    }

    #[test]
    fn every_pair_of_split_points_cr_only() {
        let (stream, expected) = sample_stream();
        let cr = stream.replace('\n', "\r");
        let bytes = cr.as_bytes();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut parser = SseParser::new();
                let mut events = parser.push(&bytes[..a]);
                events.extend(parser.push(&bytes[a..b]));
                events.extend(parser.push(&bytes[b..]));
                events.extend(parser.finish());
                assert_eq!(events, expected, "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let (stream, expected) = sample_stream();
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for byte in stream.as_bytes() {
            events.extend(parser.push(std::slice::from_ref(byte)));
        }
        assert_eq!(events, expected);
    }

    #[test]
    fn cloudflare_capture_with_padding() {
        let capture = "data: {\"response\":\"Hello\",\"p\":\"abcdefghijklmnopqrstuvw\"}\n\n\
                       data: {\"response\":\"\"}\n\n\
                       data: {\"response\":\"\",\"usage\":{\"prompt_tokens\":755,\"completion_tokens\":10,\"total_tokens\":765}}\n\n\
                       data: [DONE]\n\n";
        let events = SseParser::new().push(capture.as_bytes());
        assert_eq!(events.len(), 4);
        assert_eq!(
            events[0],
            SseEvent::Data(json!({"response": "Hello", "p": "abcdefghijklmnopqrstuvw"}))
        );
        assert_eq!(events[3], SseEvent::Done);
    }

    #[test]
    fn malformed_and_odd_lines() {
        let input = "\u{feff}data: not json\n\n\
                     data:{\"a\":1}\n\n\
                     event: message\nid: 7\nretry: 10\ndata: [1,\ndata: 2]\n\n\
                     data\n\n\
                     :no space\n\
                     \n\n\n\
                     data: \u{fffd}\n\n\
                     data: [DONE]\n\n";
        let mut parser = SseParser::new();
        let mut events = parser.push(input.as_bytes());
        events.extend(parser.push(b"data: \xff\xfe\n\n"));
        assert_eq!(
            events,
            vec![
                SseEvent::Data(Value::String("not json".into())),
                SseEvent::Data(json!({"a": 1})),
                SseEvent::Data(json!([1, 2])),
                SseEvent::Data(Value::String(String::new())),
                SseEvent::Comment("no space".into()),
                SseEvent::Data(Value::String("\u{fffd}".into())),
                SseEvent::Done,
                SseEvent::Data(Value::String("\u{fffd}\u{fffd}".into())),
            ]
        );
    }

    #[test]
    fn finish_flushes_unterminated_event() {
        let mut parser = SseParser::new();
        assert_eq!(parser.push(b"data: {\"response\":\"x\"}"), vec![]);
        assert_eq!(
            parser.finish(),
            vec![SseEvent::Data(json!({"response": "x"}))]
        );
        assert_eq!(parser.finish(), vec![]);
    }

    #[test]
    fn error_event_parses_back() {
        let err = ApiError::timeout();
        let events = SseParser::new().push(error_event(&err).as_bytes());
        assert_eq!(
            events,
            vec![SseEvent::Data(json!({
                "error": {"code": 3007, "message": "Request timeout"},
                "errors": [{"code": 3007, "message": "Request timeout"}]
            }))]
        );
    }
}
