//! Chat templates: the model's own Jinja template, rendered with minijinja the way Hugging Face
//! transformers renders it with Python's Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls,
//! and its `tojson`, `raise_exception` and `strftime_now`), so a model reads the prompt it was
//! trained on. The engine test `templates` holds every template of llama.cpp's test set to
//! Jinja2's renders of a fixed set of conversations (`scripts/make-template-renders.py`).

use crate::error::{EngineError, Result};
use crate::request::{ChatMessage, PromptInput};
use crate::tools::{Tool, ToolCalling};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Output, State, Value};

/// ChatML, used when a GGUF carries no `tokenizer.chat_template`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template plus the special-token strings templates refer to.
///
/// Real templates (Hugging Face `tokenizer_config.json` / GGUF `tokenizer.chat_template`) are
/// written for Python's Jinja2, so the environment adds what they call: Python string methods
/// (`.strip()`, `.startswith()`, ...), `raise_exception`, `strftime_now`, and `tojson`.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    tool_calling: ToolCalling,
}

fn raise_exception(msg: String) -> std::result::Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// The context variable holding the render's clock (seconds since the epoch, UTC).
const NOW_VAR: &str = "__edgerun_now";

fn strftime_now(state: &State, format: String) -> std::result::Result<Value, JinjaError> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("invalid strftime format {format:?}"),
        ));
    }
    let now = state
        .lookup(NOW_VAR)
        .and_then(|v| i64::try_from(v).ok())
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .unwrap_or_else(chrono::Utc::now);
    Ok(Value::from(
        now.format_with_items(items.into_iter()).to_string(),
    ))
}

/// A Python-style argument: the `i`th positional one, or else the keyword `name`.
fn python_arg(
    args: &[Value],
    kwargs: &Kwargs,
    i: usize,
    name: &str,
) -> std::result::Result<Option<Value>, JinjaError> {
    match args.get(i) {
        Some(v) => Ok(Some(v.clone())),
        None => kwargs.get::<Option<Value>>(name),
    }
}

/// Jinja2's `indent` (3.1): the text plus a newline, split into lines, every line but the first
/// (and that too with `first`) indented, blank lines only with `blank`; a trailing newline is
/// kept (minijinja's own drops it).
fn indent(
    value: String,
    args: minijinja::value::Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, JinjaError> {
    let arg = |i: usize, name: &str| python_arg(&args, &kwargs, i, name);
    let width = match arg(0, "width")? {
        None => " ".repeat(4),
        Some(v) if v.kind() == ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        Some(v) => " ".repeat(usize::try_from(v)?),
    };
    if width.len() > MAX_INDENT {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("indent wider than {MAX_INDENT}"),
        ));
    }
    if args.len() > 3 {
        return Err(JinjaError::new(
            ErrorKind::TooManyArguments,
            "indent takes width, first and blank",
        ));
    }
    let first = arg(1, "first")?.is_some_and(|v| v.is_true());
    let blank = arg(2, "blank")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let text = format!("{value}\n");
    let lines = py_splitlines(&text);
    let mut out = String::new();
    if blank {
        out = lines.join(&format!("\n{width}"));
    } else if let Some((head, rest)) = lines.split_first() {
        out.push_str(head);
        for line in rest {
            out.push('\n');
            if !line.is_empty() {
                out.push_str(&width);
            }
            out.push_str(line);
        }
    }
    if first {
        out.insert_str(0, &width);
    }
    Ok(Value::from(out))
}

/// Python's `str.splitlines()`: lines without their ends, no empty last line.
fn py_splitlines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = match c {
            '\r' if matches!(chars.peek(), Some((_, '\n'))) => {
                chars.next();
                i + 2
            }
            '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}'
            | '\u{2028}' | '\u{2029}' => i + c.len_utf8(),
            _ => continue,
        };
        lines.push(&text[start..i]);
        start = end;
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

/// Jinja2's `iterable` test: whatever Python can iterate — not `none`.
fn is_iterable(value: Value) -> bool {
    !value.is_none() && (value.is_undefined() || value.try_iter().is_ok())
}

/// How Jinja2 prints a value: strings as they are, everything else as Python's `str()` does
/// (`True`, `None`, `1.0`, `{'a': [1, 'b']}`), undefined as nothing.
fn py_format(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), JinjaError> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(JinjaError::from)
        }
        _ => py_repr(value)?,
    };
    out.write_str(&text).map_err(JinjaError::from)
}

/// A JSON value as templates see it, in its own key order (the caller's, as Python's dicts keep
/// it), without copying it into minijinja's maps: a shared root and the path to this node. (A
/// copy into minijinja's order-preserving maps kept a node's memory high after large tool
/// lists; this reads the request's own value in place.)
#[derive(Debug)]
struct JsonView {
    root: std::sync::Arc<serde_json::Value>,
    path: Vec<JsonStep>,
}

#[derive(Debug, Clone)]
enum JsonStep {
    Key(String),
    Index(usize),
}

impl JsonView {
    fn node(&self) -> &serde_json::Value {
        let mut v = &*self.root;
        for step in &self.path {
            v = match (step, v) {
                (JsonStep::Key(k), serde_json::Value::Object(m)) => &m[k.as_str()],
                (JsonStep::Index(i), serde_json::Value::Array(a)) => &a[*i],
                _ => unreachable!("a path built from this value"),
            };
        }
        v
    }

    fn child(&self, step: JsonStep) -> Value {
        let mut path = self.path.clone();
        path.push(step);
        json_value(&self.root, path)
    }
}

/// The template value of the node at `path` under `root`: scalars as themselves, objects and
/// arrays as [`JsonView`]s.
fn json_value(root: &std::sync::Arc<serde_json::Value>, path: Vec<JsonStep>) -> Value {
    let view = JsonView {
        root: root.clone(),
        path,
    };
    match view.node() {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (_, Some(u), _) => Value::from(u),
            (_, _, Some(f)) => Value::from(f),
            _ => Value::from(()),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => Value::from_object(view),
    }
}

/// A whole JSON value for a template.
fn json_root(v: &serde_json::Value) -> Value {
    json_value(&std::sync::Arc::new(v.clone()), Vec::new())
}

impl minijinja::value::Object for JsonView {
    fn repr(self: &std::sync::Arc<Self>) -> minijinja::value::ObjectRepr {
        match self.node() {
            serde_json::Value::Array(_) => minijinja::value::ObjectRepr::Seq,
            _ => minijinja::value::ObjectRepr::Map,
        }
    }

    fn get_value(self: &std::sync::Arc<Self>, key: &Value) -> Option<Value> {
        match self.node() {
            serde_json::Value::Object(m) => {
                let k = key.as_str()?;
                m.contains_key(k)
                    .then(|| self.child(JsonStep::Key(k.to_string())))
            }
            serde_json::Value::Array(a) => {
                let i = key.as_usize()?;
                (i < a.len()).then(|| self.child(JsonStep::Index(i)))
            }
            _ => None,
        }
    }

    fn enumerate(self: &std::sync::Arc<Self>) -> minijinja::value::Enumerator {
        match self.node() {
            serde_json::Value::Object(m) => minijinja::value::Enumerator::Values(
                m.keys().map(|k| Value::from(k.as_str())).collect(),
            ),
            serde_json::Value::Array(a) => minijinja::value::Enumerator::Seq(a.len()),
            _ => minijinja::value::Enumerator::Empty,
        }
    }

    fn enumerator_len(self: &std::sync::Arc<Self>) -> Option<usize> {
        match self.node() {
            serde_json::Value::Object(m) => Some(m.len()),
            serde_json::Value::Array(a) => Some(a.len()),
            _ => Some(0),
        }
    }
}

/// A chat message for a template: its fields in the struct's order (`role`, `content`, ...),
/// `tool_calls` in their own key order, as a Python dict would hold them.
fn message_value(m: &ChatMessage) -> Value {
    match serde_json::to_value(m) {
        Ok(v) => json_root(&v),
        Err(_) => Value::from_serialize(m),
    }
}

/// The widest indent a template may ask for (a bound on what one filter call allocates).
const MAX_INDENT: usize = 1024;
/// The deepest value printed or serialized the Python way (deeper is an error, not a crash).
const MAX_DEPTH: usize = 256;

/// Python's `repr()` of a float: the shortest digits that read back, in positional notation
/// for exponents from -4 to 15 (`1.0`, `0.0001`, `123.5`), scientific otherwise (`1e-05`,
/// `1.5e+16`), and `nan` / `inf`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{f:e}"); // shortest round-trip digits: "-1.5e16", "1e-5"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's `repr()` of a value (its `str()` for everything but strings).
fn py_repr(value: &Value) -> std::result::Result<String, JinjaError> {
    let mut out = String::new();
    py_repr_into(value, 0, &mut out)?;
    Ok(out)
}

fn py_repr_into(
    value: &Value,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    if depth > MAX_DEPTH {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("a value nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => match f64::try_from(value.clone()) {
            Ok(f) => out.push_str(&py_float(f)),
            Err(_) => out.push_str(&value.to_string()),
        },
        ValueKind::String => out.push_str(&py_str_repr(value.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr_into(&item, depth + 1, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr_into(&key, depth + 1, out)?;
                out.push_str(": ");
                py_repr_into(&value.get_item(&key).unwrap_or_default(), depth + 1, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `repr()` of a string: single quotes unless it holds one and no double quote.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// transformers' `{% generation %}` blocks (which mark the assistant's part for training
/// masks) render their body: rewritten as an `if` that is always true, keeping the tags'
/// whitespace control.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_trim, inner) = match inner.strip_prefix('-') {
            Some(i) => ("-", i),
            None => ("", inner),
        };
        let (inner, close_trim) = match inner.strip_suffix('-') {
            Some(i) => (i, "-"),
            None => (inner, ""),
        };
        match inner.trim() {
            "generation" => out.push_str(&format!("{{%{open_trim} if true {close_trim}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open_trim} endif {close_trim}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` — `", "` and `": "` between items unless
/// indented, no HTML escaping (minijinja's own escapes `<`, `>`, `&` and `'`).
fn tojson(
    value: Value,
    args: minijinja::value::Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, JinjaError> {
    // transformers' signature: tojson(x, ensure_ascii=False, indent=None, separators=None,
    // sort_keys=False).
    if args.len() > 4 {
        return Err(JinjaError::new(
            ErrorKind::TooManyArguments,
            "tojson takes ensure_ascii, indent, separators and sort_keys",
        ));
    }
    let arg = |i: usize, name: &str| python_arg(&args, &kwargs, i, name);
    let ensure_ascii = arg(0, "ensure_ascii")?.map(|v| v.is_true());
    let indent: Option<usize> = match arg(1, "indent")? {
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
        None => None,
    };
    let separators = arg(2, "separators")?.filter(|v| !v.is_none());
    let sort_keys = arg(3, "sort_keys")?.map(|v| v.is_true());
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_INDENT) {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent wider than {MAX_INDENT}"),
        ));
    }
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators {
        Some(seps) => {
            let get = |i: usize| -> std::result::Result<String, JinjaError> {
                seps.get_item(&Value::from(i))
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .ok_or_else(|| {
                        JinjaError::new(ErrorKind::InvalidOperation, "tojson: bad separators")
                    })
            };
            (get(0)?, get(1)?)
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    if json_depth(&json) > MAX_DEPTH {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("tojson: a value nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    py_json(
        &json,
        &PyJson {
            indent,
            item_sep: &item_sep,
            key_sep: &key_sep,
            sort_keys: sort_keys.unwrap_or(false),
            ensure_ascii: ensure_ascii.unwrap_or(false),
        },
        0,
        &mut out,
    );
    Ok(Value::from_safe_string(out))
}

struct PyJson<'a> {
    indent: Option<usize>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn json_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Writes `v` as Python's `json.dumps` would with these options.
fn py_json(v: &serde_json::Value, o: &PyJson, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => match n.as_f64() {
            // Python writes floats as repr() does (1.0, 1e-05), integers as they are.
            Some(f) if n.is_f64() => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        J::String(s) => py_string(s, o.ensure_ascii, out),
        J::Array(items) if items.is_empty() => out.push_str("[]"),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(o.item_sep);
                }
                newline(out, depth + 1);
                py_json(item, o, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if map.is_empty() => out.push_str("{}"),
        J::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(o.item_sep);
                }
                newline(out, depth + 1);
                py_string(k, o.ensure_ascii, out);
                out.push_str(o.key_sep);
                py_json(item, o, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// A JSON string as Python writes it: `\n`, `\"`, `\\` and friends, other control
/// characters as `\u00XX`, the rest as is (or, with `ensure_ascii`, as `\uXXXX` escapes).
fn py_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("indent", indent);
        env.add_test("iterable", is_iterable);
        env.add_filter("string", |v: Value| match v.kind() {
            ValueKind::String => Ok(v),
            _ => py_repr(&v).map(Value::from),
        });
        env.set_formatter(py_format);
        // transformers' environment: a block tag's newline is dropped, and the whitespace
        // before a block tag on its line too.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", without_generation_tags(source))
            .map_err(|e| EngineError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            tool_calling: ToolCalling::detect(source),
        })
    }

    /// How this model writes tool calls, and whether the template shows it the tools.
    pub fn tool_calling(&self) -> ToolCalling {
        self.tool_calling
    }

    /// [`ChatTemplate::render_input`] with tools: given to a template that renders them,
    /// otherwise described in the system message (`tools.rs`). No tools: the plain rendering.
    pub fn render_with_tools(&self, input: &PromptInput, tools: &[Tool]) -> Result<String> {
        if tools.is_empty() {
            return self.render_input(input, None);
        }
        if self.tool_calling.native {
            return self.render_input(input, Some(&ToolCalling::template_tools(tools)));
        }
        let messages = match input {
            PromptInput::Prompt { text, raw: true } => return Ok(text.clone()),
            PromptInput::Prompt { text, raw: false } => {
                vec![ChatMessage::new("user", text.clone())]
            }
            PromptInput::Messages(messages) => messages.clone(),
        };
        // Templates that refuse a system role (Gemma's) get the tools in the first user turn.
        self.render(
            &ToolCalling::rewrite_for_plain_template(tools, &messages, true),
            None,
        )
        .or_else(|_| {
            self.render(
                &ToolCalling::rewrite_for_plain_template(tools, &messages, false),
                None,
            )
        })
    }

    /// The text the model reads for an input: the template applied to messages (a bare prompt
    /// is one user message), or the prompt as given when `raw` is set.
    pub fn render_input(
        &self,
        input: &PromptInput,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        match input {
            PromptInput::Prompt { text, raw: true } => Ok(text.clone()),
            PromptInput::Prompt { text, raw: false } => {
                self.render(&[ChatMessage::new("user", text.clone())], tools)
            }
            PromptInput::Messages(messages) => self.render(messages, tools),
        }
    }

    /// Renders a conversation, ending with the assistant's turn opened.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        self.render_at(messages, tools, chrono::Utc::now())
    }

    /// [`ChatTemplate::render`] as if the time were `now` (`strftime_now`, `date_string`).
    pub fn render_at(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from(messages.iter().map(message_value).collect::<Vec<_>>()),
            tools => tools.map(json_root),
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            date_string => now.format("%d %b %Y").to_string(),
            __edgerun_now => now.timestamp(),
        };
        tmpl.render(ctx)
            .map_err(|e| EngineError::Template(describe(&e)))
    }
}

fn describe(e: &JinjaError) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.0, "-2.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345.6, "123456789012345.6"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn generation_tags_become_ifs_and_odd_tags_are_left_alone() {
        assert_eq!(
            without_generation_tags("a{%- generation -%}b{% endgeneration %}c"),
            "a{%- if true -%}b{% endif %}c"
        );
        for odd in ["{%}", "x {% if", "{{ '{%}' }}", "%}{%"] {
            assert_eq!(without_generation_tags(odd), odd);
        }
    }

    #[test]
    fn values_print_as_python_does_and_nesting_is_bounded() {
        let t = ChatTemplate::new(
            "{{ x }}|{{ y }}|{{ z }}|{{ w | string }}|{{ s }}",
            None,
            None,
        )
        .unwrap();
        let env = &t.env;
        let out = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! {
                x => true,
                y => (),
                z => serde_json::json!({"a": [1, 2.5, "it's"], "b": null}),
                w => vec![false],
                s => "plain",
            })
            .unwrap();
        assert_eq!(
            out,
            "True|None|{'a': [1, 2.5, \"it's\"], 'b': None}|[False]|plain"
        );
        let mut deep = serde_json::json!(1);
        for _ in 0..300 {
            deep = serde_json::json!([deep]);
        }
        let v = Value::from_serialize(&deep);
        assert!(py_repr(&v).is_err());
    }
}
