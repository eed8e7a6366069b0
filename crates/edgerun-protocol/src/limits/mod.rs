//! Bounds on everything a caller controls, checked before any of it runs.
//!
//! A caller's JSON schema, regex and tool list are untrusted code: the grammar engine
//! (llguidance, on the node) compiles schemas by recursion, following `$ref`s, and a chain of a
//! few hundred `$defs` once overflowed a thread's stack, which aborts the whole process. So every
//! schema a request carries (`response_format`'s, each tool's `parameters`) is *measured* here,
//! where the node and the Worker both validate, and refused with a 400 naming the limit when it
//! is over one ([`check_schema`]):
//!
//! | measure | what it counts | default |
//! |---|---|---|
//! | size | bytes of the schema as compact JSON | [`SchemaLimits::DEFAULT`]`.max_bytes` (128 KiB) |
//! | nodes | JSON values in the schema | 10,000 |
//! | depth | containers (objects, arrays) on the deepest path a compiler walks from the root, *following `$ref`s* (a cycle counts once, whole) | 128 |
//! | `$ref` depth | `$ref`s followed one after another on the longest such path (a cycle counts each of its `$ref`s once) | 32 |
//!
//! Depth is what bounds the grammar compiler's recursion: the node compiles on a thread whose
//! stack is sized for it (`edgerun-engine`'s `GrammarLimits`). Both depths are upper bounds on
//! any walk the compiler can take: the containers and `$ref`s a schema reaches form a graph whose
//! strongly connected components (recursion) are collapsed, each weighing what it holds, and the
//! heaviest path from the root through that DAG is the measure. `$defs` / `definitions` are
//! reached only through `$ref`s, as a compiler reaches them; `const`, `enum`, `default` and
//! `examples` hold data, not schemas (counted, never read as `$ref`s or keywords).
//!
//! A `pattern` (and each `patternProperties` key) may not expand to more than
//! [`MAX_PATTERN_EXPANSION`] atoms once its counted repetitions (`{n}`, `{n,m}`) are written
//! out ([`pattern_expansion`]): `^((a{100}){100}){100}$` would be a million, which the grammar
//! engine builds before any of its fuel limits applies.
//!
//! What a schema may not hold at all, because the node could not bound or honour it:
//! `x-guidance` (the grammar engine's own options: `lenient` would silently drop keywords such
//! as `uniqueItems`, which must be refused instead), a `$ref` that is not a JSON pointer into
//! the schema itself (`#` or `#/...`: remote and `$anchor` references), and `$id` anywhere but
//! at the root (it would move what `#` means beneath it).
//!
//! The measurement is iterative (an explicit stack; no recursion over caller-controlled
//! nesting) and O(n log n) in the schema's size: one walk, one pointer resolution per `$ref`,
//! one strongly-connected-components pass. It stops as soon as the size or node count is over
//! its limit.
//!
//! Lists are bounded too ([`RequestLimits`]): tools (OpenAI's 128 by default; names unique,
//! checked with a hash set), each tool's description, messages, content parts per message and
//! tool calls per message; the OpenAI dialect bounds `stop` (4 strings of at most
//! [`MAX_STOP_CHARS`]) and `top_logprobs` (20) itself.
//!
//! The node takes its limits from flags (`--max-schema-bytes`, `--max-schema-nodes`,
//! `--max-schema-depth`, `--max-schema-ref-depth`, `--max-tools`); the Worker validates with
//! [`RequestLimits::DEFAULT`].

mod pattern;
mod schema;

pub use pattern::pattern_expansion;
pub use schema::{check_schema, SchemaError, SchemaSize};

/// Longest `stop` string, in characters.
pub const MAX_STOP_CHARS: usize = 1024;

/// Largest a `pattern` (or `patternProperties` key) may grow when its counted repetitions are
/// written out (`(a{100}){100}` is 10,000): the grammar engine expands them while it builds
/// the lexer, before any fuel limit applies.
pub const MAX_PATTERN_EXPANSION: u64 = 10_000;

/// Bounds on one JSON schema (see the module docs for what each counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaLimits {
    /// Bytes of the schema as compact JSON.
    pub max_bytes: usize,
    /// JSON values in the schema.
    pub max_nodes: usize,
    /// Containers on the deepest path, following `$ref`s.
    pub max_depth: usize,
    /// `$ref`s followed one after another.
    pub max_ref_depth: usize,
}

impl SchemaLimits {
    /// The defaults: 128 KiB, 10,000 nodes, depth 128, `$ref` depth 32.
    pub const DEFAULT: Self = Self {
        max_bytes: 128 * 1024,
        max_nodes: 10_000,
        max_depth: 128,
        max_ref_depth: 32,
    };
    /// The largest depth a node may be configured with (its grammar thread's stack grows with
    /// it).
    pub const MAX_DEPTH: usize = 4096;
}

impl Default for SchemaLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Bounds on every list and schema a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Each schema: `response_format`'s and every tool's `parameters`.
    pub schema: SchemaLimits,
    /// Tools in one request (OpenAI allows 128).
    pub max_tools: usize,
    /// Characters of one tool's description.
    pub max_tool_description_chars: usize,
    /// Messages in one request.
    pub max_messages: usize,
    /// Content parts in one message.
    pub max_content_parts: usize,
    /// Tool calls in one assistant message sent back.
    pub max_tool_calls: usize,
}

impl RequestLimits {
    /// The defaults, which the Worker validates with: [`SchemaLimits::DEFAULT`], 128 tools of
    /// descriptions up to 8,192 characters, 2,048 messages of up to 256 content parts and 128
    /// tool calls each.
    pub const DEFAULT: Self = Self {
        schema: SchemaLimits::DEFAULT,
        max_tools: 128,
        max_tool_description_chars: 8192,
        max_messages: 2048,
        max_content_parts: 256,
        max_tool_calls: 128,
    };

    /// Checks a configuration: every limit at least 1, the depth at most
    /// [`SchemaLimits::MAX_DEPTH`]. The error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let s = &self.schema;
        for (name, value) in [
            ("max schema bytes", s.max_bytes),
            ("max schema nodes", s.max_nodes),
            ("max schema depth", s.max_depth),
            ("max schema $ref depth", s.max_ref_depth),
            ("max tools", self.max_tools),
            (
                "max tool description characters",
                self.max_tool_description_chars,
            ),
            ("max messages", self.max_messages),
            ("max content parts", self.max_content_parts),
            ("max tool calls", self.max_tool_calls),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if s.max_depth > SchemaLimits::MAX_DEPTH {
            return Err(format!(
                "max schema depth must be at most {}, got {}",
                SchemaLimits::MAX_DEPTH,
                s.max_depth
            ));
        }
        Ok(())
    }
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests;
