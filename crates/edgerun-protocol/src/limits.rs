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

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

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

/// What [`check_schema`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SchemaSize {
    /// Bytes as compact JSON.
    pub bytes: usize,
    /// JSON values.
    pub nodes: usize,
    /// Containers on the deepest path, following `$ref`s.
    pub depth: usize,
    /// `$ref`s followed one after another.
    pub ref_depth: usize,
}

/// Why a schema was refused: which limit (or forbidden construct), in words for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError(String);

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a container is read: as a schema (keys are keywords), a map of named schemas
/// (`properties`, `$defs`, ...), a list of schemas (`anyOf`, ...), or data (`enum`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Schema,
    Named,
    List,
    Data,
}

/// The role of the value under keyword `key` of a schema, and whether a compiler walks into it
/// from the schema (`$defs` are reached only through `$ref`s).
fn keyword_role(key: &str, value: &Value) -> (Role, bool) {
    match key {
        "properties" | "patternProperties" | "dependentSchemas" => (Role::Named, true),
        "$defs" | "definitions" => (Role::Named, false),
        "allOf" | "anyOf" | "oneOf" | "prefixItems" => (Role::List, true),
        "items" if value.is_array() => (Role::List, true),
        "items"
        | "additionalItems"
        | "additionalProperties"
        | "unevaluatedItems"
        | "unevaluatedProperties"
        | "propertyNames"
        | "contains"
        | "not"
        | "if"
        | "then"
        | "else"
        | "contentSchema" => (Role::Schema, true),
        _ => (Role::Data, true),
    }
}

/// Bytes of a string as serde_json writes it (quotes and escapes included).
fn quoted_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => "a scalar",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The node a local `$ref` points to: `#` or a JSON pointer fragment (percent-decoded, then
/// `~1` / `~0` unescaped), or `None` when it points nowhere.
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let fragment = reference.strip_prefix('#')?;
    if fragment.is_empty() {
        return Some(root);
    }
    let fragment = percent_encoding::percent_decode_str(fragment)
        .decode_utf8()
        .ok()?;
    let mut node = root;
    for segment in fragment.strip_prefix('/')?.split('/') {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        node = match node {
            Value::Object(map) => map.get(&segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
}

/// A value still to visit: the value, how it is read, and its parent container with whether
/// a compiler walks from the parent into it (`None`: the root).
type Pending<'a> = (&'a Value, Role, Option<(u32, bool)>);

/// One container of the schema: its children a compiler walks into, and its `$ref`'s target.
struct Node<'a> {
    children: Vec<u32>,
    /// Whether it is a schema holding a `$ref` (counted by the `$ref` depth).
    is_ref: bool,
    /// The container, and whether it is read as a schema.
    value: &'a Value,
    schema: bool,
}

/// Measures `schema` against `limits` (see the module docs); `at` names it in errors (for
/// example `'response_format.json_schema.schema'`). Never recurses, never panics.
pub fn check_schema(
    schema: &Value,
    at: &str,
    limits: &SchemaLimits,
) -> Result<SchemaSize, SchemaError> {
    let refuse = |what: String| Err(SchemaError(format!("{at}: {what}")));
    // Pass 1: count, size, index the containers, note every `$ref`.
    let mut size = SchemaSize::default();
    let mut index: HashMap<*const Value, u32> = HashMap::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut refs: Vec<(u32, &str)> = Vec::new();
    let mut stack: Vec<Pending> = vec![(schema, Role::Schema, None)];
    while let Some((value, role, parent)) = stack.pop() {
        size.nodes += 1;
        if size.nodes > limits.max_nodes {
            return refuse(format!(
                "the schema has more than {} nodes (JSON values); the schema node limit is {}",
                limits.max_nodes, limits.max_nodes
            ));
        }
        // Separators: one per member after the first, counted on the container.
        size.bytes += match value {
            Value::Null => 4,
            Value::Bool(b) => 4 + usize::from(!b),
            Value::Number(n) => n.to_string().len(),
            Value::String(s) => quoted_len(s),
            Value::Array(items) => 2 + items.len().saturating_sub(1),
            Value::Object(map) => {
                2 + map.len().saturating_sub(1)
                    + map.keys().map(|k| quoted_len(k) + 1).sum::<usize>()
            }
        };
        if size.bytes > limits.max_bytes {
            return refuse(format!(
                "the schema is more than {} bytes as JSON; the schema size limit is {}",
                limits.max_bytes, limits.max_bytes
            ));
        }
        let (Value::Array(_) | Value::Object(_)) = value else {
            continue;
        };
        let id = nodes.len() as u32;
        index.insert(value as *const Value, id);
        nodes.push(Node {
            children: Vec::new(),
            is_ref: false,
            value,
            schema: role == Role::Schema,
        });
        if let Some((parent, true)) = parent {
            nodes[parent as usize].children.push(id);
        }
        match (value, role) {
            (Value::Object(map), Role::Schema) => {
                if let Err(e) = check_keywords(map, parent.is_none()) {
                    return refuse(e);
                }
                if let Some(Value::String(reference)) = map.get("$ref") {
                    nodes[id as usize].is_ref = true;
                    refs.push((id, reference));
                }
                for (key, child) in map {
                    let (role, walked) = keyword_role(key, child);
                    stack.push((child, role, Some((id, walked))));
                }
            }
            (Value::Object(map), Role::Named) => {
                for child in map.values() {
                    stack.push((child, Role::Schema, Some((id, true))));
                }
            }
            (Value::Array(items), Role::List) => {
                for child in items {
                    stack.push((child, Role::Schema, Some((id, true))));
                }
            }
            (Value::Object(map), _) => {
                for child in map.values() {
                    stack.push((child, Role::Data, Some((id, true))));
                }
            }
            (Value::Array(items), _) => {
                for child in items {
                    stack.push((child, Role::Data, Some((id, true))));
                }
            }
            _ => {}
        }
    }
    if nodes.is_empty() {
        // `true` / `false`: nothing to walk.
        return Ok(size);
    }
    // `$ref` edges. A target that is not a container (a boolean schema) ends the walk; one that
    // does not exist is the compiler's to report.
    for (from, reference) in refs {
        if !reference.starts_with('#') {
            return refuse(format!(
                "'$ref' '{}' is not a reference within the schema: only '#' and '#/...' (JSON \
                 pointers into the schema itself) are accepted",
                clip(reference)
            ));
        }
        if reference.len() > 1 && !reference.starts_with("#/") {
            return refuse(format!(
                "'$ref' '{}' names an anchor: only '#' and '#/...' (JSON pointers) are accepted",
                clip(reference)
            ));
        }
        if let Some(target) = resolve(schema, reference) {
            if let Some(&to) = index.get(&(target as *const Value)) {
                nodes[from as usize].children.push(to);
            }
        }
    }
    let (depth, ref_depth) = heaviest_paths(&nodes);
    size.depth = depth;
    size.ref_depth = ref_depth;
    if ref_depth > limits.max_ref_depth {
        return refuse(format!(
            "the schema follows {ref_depth} '$ref's one after another; the schema $ref depth \
             limit is {}",
            limits.max_ref_depth
        ));
    }
    if depth > limits.max_depth {
        return refuse(format!(
            "the schema nests {depth} levels deep (counting the levels its '$ref's lead to); \
             the schema depth limit is {}",
            limits.max_depth
        ));
    }
    if !has_finite_instance(schema, &nodes, &index) {
        return refuse(
            "no finite JSON value satisfies the schema: every instance would have to contain \
             itself (a required property or item whose '$ref's lead back to where it is)"
                .into(),
        );
    }
    Ok(size)
}

/// Whether some finite JSON value can satisfy `root`: the least fixed point of "a schema has a
/// finite instance when everything it requires has one" (a `$ref`'s target, every `allOf`
/// member, one `anyOf` / `oneOf` option, an object-only schema's required properties, an
/// array-only schema's first `minItems` items), computed like Horn satisfiability with a
/// counter per schema: O(nodes + edges). Only what *must* recurse forever is caught (a
/// generator could never end it); `const` / `enum` and any schema allowing a scalar type are
/// finite. Conservative: whatever it does not understand counts as finite.
fn has_finite_instance(root: &Value, nodes: &[Node], index: &HashMap<*const Value, u32>) -> bool {
    let n = nodes.len();
    let mut need = vec![0u32; n];
    let mut or_node = vec![false; n];
    let mut impossible = vec![false; n];
    let mut dependents: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut ready: Vec<u32> = Vec::new();
    // What a dependency on `v` means for `of`: nothing (finite), impossible, or an edge.
    let is_schema_node = |v: &Value| {
        index
            .get(&(v as *const Value))
            .copied()
            .filter(|&i| nodes[i as usize].schema && v.is_object())
    };
    for (i, node) in nodes.iter().enumerate() {
        let Value::Object(map) = node.value else {
            continue;
        };
        if !node.schema {
            continue;
        }
        let mut deps: Vec<u32> = Vec::new();
        let mut ors: Vec<u32> = Vec::new();
        let mut dep = |v: &Value, impossible: &mut bool| match v {
            Value::Bool(false) => *impossible = true,
            _ => deps.extend(is_schema_node(v)),
        };
        let mut never = false;
        if !(map.contains_key("const") || map.contains_key("enum")) {
            if let Some(Value::String(r)) = map.get("$ref") {
                if let Some(target) = resolve(root, r) {
                    dep(target, &mut never);
                }
            }
            if let Some(Value::Array(all)) = map.get("allOf") {
                for v in all {
                    dep(v, &mut never);
                }
            }
            for key in ["anyOf", "oneOf"] {
                if let Some(options @ Value::Array(items)) = map.get(key) {
                    if let Some(&l) = index.get(&(options as *const Value)) {
                        let l = l as usize;
                        or_node[l] = true;
                        if items.iter().any(|v| v == &Value::Bool(true)) {
                            ready.push(l as u32);
                        }
                        for v in items {
                            if let Some(o) = is_schema_node(v) {
                                dependents[o as usize].push(l as u32);
                            } else if !matches!(v, Value::Bool(false)) {
                                ready.push(l as u32);
                            }
                        }
                        ors.push(l as u32);
                    }
                }
            }
            let only = |t: &str| match map.get("type") {
                Some(Value::String(s)) => s == t,
                Some(Value::Array(ts)) => ts.len() == 1 && ts[0] == t,
                _ => false,
            };
            if only("object") {
                let properties = map.get("properties").and_then(Value::as_object);
                for name in map
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(name) = name.as_str() else { continue };
                    match properties.and_then(|p| p.get(name)) {
                        Some(v) => dep(v, &mut never),
                        None => {
                            if let Some(v) = map.get("additionalProperties") {
                                dep(v, &mut never);
                            }
                        }
                    }
                }
            }
            if only("array") {
                let min = map.get("minItems").and_then(Value::as_u64).unwrap_or(0);
                let prefix = map.get("prefixItems").and_then(Value::as_array);
                let prefix_len = prefix.map_or(0, Vec::len) as u64;
                for v in prefix.into_iter().flatten().take(min as usize) {
                    dep(v, &mut never);
                }
                if min > prefix_len {
                    if let Some(v) = map.get("items").filter(|v| !v.is_array()) {
                        dep(v, &mut never);
                    }
                }
            }
        }
        deps.extend(ors);
        impossible[i] = never;
        need[i] = deps.len() as u32;
        for d in deps {
            dependents[d as usize].push(i as u32);
        }
        if need[i] == 0 && !never {
            ready.push(i as u32);
        }
    }
    let mut finite = vec![false; n];
    while let Some(v) = ready.pop() {
        let vi = v as usize;
        if finite[vi] {
            continue;
        }
        finite[vi] = true;
        for &d in &dependents[vi] {
            let di = d as usize;
            if or_node[di] {
                ready.push(d);
            } else {
                need[di] = need[di].saturating_sub(1);
                if need[di] == 0 && !impossible[di] {
                    ready.push(d);
                }
            }
        }
    }
    // Node 0 is the root (a boolean root has no node and never gets here).
    !nodes[0].schema || !nodes[0].value.is_object() || finite[0]
}

/// A reference, shortened for an error message.
fn clip(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(64).collect::<String>())
    }
}

/// Keywords a schema may not use (see the module docs).
fn check_keywords(map: &Map<String, Value>, root: bool) -> Result<(), String> {
    if map.contains_key("x-guidance") {
        return Err(
            "'x-guidance' (the grammar engine's own options) is not accepted: every \
                    keyword of a schema is enforced or refused, never relaxed"
                .into(),
        );
    }
    if !root && map.contains_key("$id") {
        return Err("'$id' is accepted only at the schema's root".into());
    }
    for key in ["$dynamicRef", "$recursiveRef"] {
        if map.contains_key(key) {
            return Err(format!("'{key}' is not supported: use '$ref'"));
        }
    }
    if let Some(r) = map.get("$ref").filter(|r| !r.is_string()) {
        return Err(format!("'$ref' must be a string, got {}", kind_of(r)));
    }
    let patterns = map
        .get("pattern")
        .and_then(Value::as_str)
        .into_iter()
        .chain(
            map.get("patternProperties")
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|p| p.keys().map(String::as_str)),
        );
    for pattern in patterns {
        let size = pattern_expansion(pattern);
        if size > MAX_PATTERN_EXPANSION {
            return Err(format!(
                "the pattern '{}' expands to more than {MAX_PATTERN_EXPANSION} atoms once its \
                 counted repetitions are written out (the pattern expansion limit)",
                clip(pattern)
            ));
        }
    }
    Ok(())
}

/// How many atoms `pattern` (a regular expression) holds with its counted repetitions written
/// out: each `{n}` / `{n,}` / `{n,m}` multiplies what it repeats by its largest count;
/// alternatives add up; `*`, `+`, `?` count once. An upper bound on what a regex compiler
/// expands, saturating; one pass, no recursion.
pub fn pattern_expansion(pattern: &str) -> u64 {
    // Per open group: (atoms so far, size of the last atom).
    let mut frames: Vec<(u64, u64)> = vec![(0, 0)];
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let atom = match c {
            '\\' => {
                // An escape; `\p{..}` names a class.
                if matches!(chars.get(i), Some('p' | 'P')) && chars.get(i + 1) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                }
                i += 1;
                1
            }
            '[' => {
                // A class: to its closing bracket (a leading `]` or `^]` is a member).
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                if chars.get(i) == Some(&']') {
                    i += 1;
                }
                while i < chars.len() && chars[i] != ']' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                1
            }
            '(' => {
                frames.push((0, 0));
                continue;
            }
            ')' => match frames.len() {
                1 => 1,
                _ => frames.pop().map_or(1, |(total, _)| total.max(1)),
            },
            '{' => {
                // A counted repetition, or a literal brace.
                let close = chars[i..].iter().position(|&c| c == '}');
                let counts = close.and_then(|end| {
                    let inner: String = chars[i..i + end].iter().collect();
                    let mut parts = inner.splitn(2, ',');
                    let low: u64 = parts.next()?.trim().parse().ok()?;
                    let high = match parts.next() {
                        None => low,
                        Some(h) if h.trim().is_empty() => low,
                        Some(h) => h.trim().parse().ok()?,
                    };
                    Some((end, low.max(high)))
                });
                if let Some((end, count)) = counts {
                    i += end + 1;
                    let frame = frames.last_mut().expect("the outer frame stays");
                    let grown = frame.1.saturating_mul(count);
                    frame.0 = frame.0.saturating_sub(frame.1).saturating_add(grown);
                    frame.1 = grown;
                    continue;
                }
                1
            }
            '*' | '+' | '?' | '|' | '^' | '$' => continue,
            _ => 1,
        };
        let frame = frames.last_mut().expect("the outer frame stays");
        frame.0 = frame.0.saturating_add(atom);
        frame.1 = atom;
    }
    // Unclosed groups count as closed.
    let mut total = 0u64;
    while let Some((size, _)) = frames.pop() {
        total = total.saturating_add(size);
    }
    total
}

/// The heaviest path from node 0 (the root) through the graph of `nodes`, with each strongly
/// connected component collapsed into one vertex weighing what it holds: (containers, `$ref`
/// nodes). Tarjan's algorithm, iteratively; components come out in reverse topological order,
/// so each one's successors are done before it.
fn heaviest_paths(nodes: &[Node]) -> (usize, usize) {
    const UNSEEN: u32 = u32::MAX;
    let n = nodes.len();
    let mut order = vec![UNSEEN; n];
    let mut low = vec![0u32; n];
    let mut on_stack = vec![false; n];
    let mut component = vec![UNSEEN; n];
    // Per component: heaviest path starting in it (containers, refs).
    let mut best: Vec<(usize, usize)> = Vec::new();
    let mut tarjan: Vec<u32> = Vec::new();
    let mut next = 0u32;
    // (node, index of its next child to visit)
    let mut calls: Vec<(u32, usize)> = vec![(0, 0)];
    order[0] = next;
    low[0] = next;
    next += 1;
    tarjan.push(0);
    on_stack[0] = true;
    while let Some(&mut (v, ref mut child)) = calls.last_mut() {
        let vi = v as usize;
        if let Some(&w) = nodes[vi].children.get(*child) {
            *child += 1;
            let wi = w as usize;
            if order[wi] == UNSEEN {
                order[wi] = next;
                low[wi] = next;
                next += 1;
                tarjan.push(w);
                on_stack[wi] = true;
                calls.push((w, 0));
            } else if on_stack[wi] {
                low[vi] = low[vi].min(order[wi]);
            }
            continue;
        }
        calls.pop();
        if let Some(&(parent, _)) = calls.last() {
            let pi = parent as usize;
            low[pi] = low[pi].min(low[vi]);
        }
        if low[vi] != order[vi] {
            continue;
        }
        // `v` roots a component: pop it, weigh it, add its heaviest successor.
        let c = best.len() as u32;
        let mut members = Vec::new();
        loop {
            let w = tarjan.pop().expect("v is on the stack");
            on_stack[w as usize] = false;
            component[w as usize] = c;
            members.push(w);
            if w == v {
                break;
            }
        }
        let mut weight = (members.len(), 0usize);
        let mut after = (0usize, 0usize);
        for &m in &members {
            let node = &nodes[m as usize];
            weight.1 += usize::from(node.is_ref);
            for &w in &node.children {
                let cw = component[w as usize];
                if cw != c && cw != UNSEEN {
                    let (d, r) = best[cw as usize];
                    after = (after.0.max(d), after.1.max(r));
                }
            }
        }
        best.push((weight.0 + after.0, weight.1 + after.1));
    }
    best.last().copied().unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn measure(schema: &Value) -> SchemaSize {
        let limits = SchemaLimits {
            max_bytes: usize::MAX,
            max_nodes: usize::MAX,
            max_depth: usize::MAX,
            max_ref_depth: usize::MAX,
        };
        check_schema(schema, "s", &limits).unwrap()
    }

    fn refused(schema: &Value) -> String {
        check_schema(schema, "s", &SchemaLimits::DEFAULT)
            .unwrap_err()
            .to_string()
    }

    /// `d0 = {type: object, properties: {x: {$ref: d1}}, required: [x]}`, ... (finding 1).
    fn object_chain(n: usize) -> Value {
        let mut defs = Map::new();
        for i in 0..n {
            defs.insert(
                format!("d{i}"),
                json!({"type": "object", "properties": {"x": {"$ref": format!("#/$defs/d{}", i + 1)}},
                       "required": ["x"]}),
            );
        }
        defs.insert(format!("d{n}"), json!({"type": "string"}));
        json!({"$ref": "#/$defs/d0", "$defs": defs})
    }

    /// `d0 = {$ref: d1}`, ...
    fn alias_chain(n: usize) -> Value {
        let mut defs = Map::new();
        for i in 0..n {
            defs.insert(
                format!("d{i}"),
                json!({"$ref": format!("#/$defs/d{}", i + 1)}),
            );
        }
        defs.insert(format!("d{n}"), json!({"type": "string"}));
        json!({"$ref": "#/$defs/d0", "$defs": defs})
    }

    #[test]
    fn sizes_are_what_serde_json_writes() {
        for v in [
            json!({"a": [1, 2.5, -3, null, true, false], "b\"\n\u{1}": "x\\y\u{7f}é", "c": {}}),
            json!([]),
            json!("plain"),
            json!({"type": "object", "properties": {"a": {"enum": [1, "two", [3], {"4": 4}]}}}),
        ] {
            assert_eq!(
                measure(&v).bytes,
                serde_json::to_string(&v).unwrap().len(),
                "{v}"
            );
        }
        assert_eq!(measure(&json!({"a": [1, {"b": 2}]})).nodes, 5);
    }

    #[test]
    fn depth_follows_refs_and_counts_a_cycle_once() {
        assert_eq!(measure(&json!({"type": "string"})).depth, 1);
        let nested = json!({"type": "object", "properties": {"a": {"type": "object",
                            "properties": {"b": {"type": "integer"}}}}});
        assert_eq!((measure(&nested).depth, measure(&nested).ref_depth), (5, 0));
        // `$defs` are walked only through a `$ref`: an unused one adds nothing.
        let unused = json!({"type": "string", "$defs": {"deep": {"a": {"b": {"c": {}}}}}});
        assert_eq!(measure(&unused).depth, 1);
        // The chains of finding 1: each link of the object chain is 3 containers.
        let m = measure(&object_chain(10));
        assert_eq!((m.depth, m.ref_depth), (1 + 3 * 10 + 1, 11));
        let m = measure(&alias_chain(10));
        assert_eq!((m.depth, m.ref_depth), (12, 11));
        // A recursive tree is one cycle: bounded, counted once.
        let tree = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
            "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}});
        let m = measure(&tree);
        assert_eq!((m.depth, m.ref_depth), (1 + 4, 2));
        assert_eq!(
            measure(&json!({"anyOf": [{"$ref": "#"}, {"type": "null"}]})).ref_depth,
            1
        );
        // A data keyword's "$ref" is data.
        let data = json!({"const": {"$ref": "#/nowhere"}, "enum": [{"$ref": 5}]});
        assert_eq!(measure(&data).ref_depth, 0);
    }

    #[test]
    fn the_findings_chains_are_refused_naming_the_limit() {
        for schema in [
            object_chain(218),
            alias_chain(597),
            object_chain(250),
            alias_chain(600),
        ] {
            let e = refused(&schema);
            assert!(e.contains("$ref depth limit is 32"), "{e}");
        }
        // Deep nesting without a single `$ref`.
        let mut deep = json!({"type": "string"});
        for _ in 0..80 {
            deep = json!({"type": "object", "properties": {"a": deep}});
        }
        assert!(refused(&deep).contains("schema depth limit is 128"));
        let e = refused(&json!({"enum": (0..20_000).collect::<Vec<_>>()}));
        assert!(e.contains("node limit is 10000"), "{e}");
        let e = refused(&json!({"description": "x".repeat(200_000)}));
        assert!(e.contains("size limit is 131072"), "{e}");
        // Within the limits.
        let m = check_schema(&object_chain(20), "s", &SchemaLimits::DEFAULT).unwrap();
        assert_eq!(m.ref_depth, 21);
    }

    #[test]
    fn a_very_deep_value_never_overflows_the_stack() {
        // Deeper than serde_json would ever parse: built in place.
        // (`json!` would serialise `deep` again, recursively: build the maps by hand.)
        let mut deep = json!({"type": "string"});
        for _ in 0..100_000 {
            let mut map = Map::new();
            map.insert("anyOf".into(), Value::Array(vec![deep]));
            deep = Value::Object(map);
        }
        let limits = SchemaLimits {
            max_bytes: usize::MAX,
            max_nodes: usize::MAX,
            max_depth: 50,
            max_ref_depth: 50,
        };
        assert!(check_schema(&deep, "s", &limits)
            .unwrap_err()
            .to_string()
            .contains("depth limit"));
        // Dropped without recursion too (serde_json's Value drop recurses).
        let mut stack = vec![deep];
        while let Some(mut v) = stack.pop() {
            if let Some(Value::Array(items)) = v.get_mut("anyOf") {
                stack.append(items);
            }
        }
    }

    #[test]
    fn schemas_only_an_infinite_value_satisfies_are_refused() {
        for schema in [
            json!({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
            json!({"$ref": "#"}),
            ref_cycle_required(3),
            json!({"type": "array", "minItems": 1, "items": {"$ref": "#"}}),
            json!({"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, false]}},
                   "required": ["a"]}),
            json!({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}}),
        ] {
            let e = refused(&schema);
            assert!(e.contains("no finite JSON value"), "{schema}: {e}");
        }
        // Recursion with a way out is fine.
        for schema in [
            json!({"type": "object", "properties": {"x": {"$ref": "#"}}}),
            json!({"type": "object", "properties": {"x": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                   "required": ["x"]}),
            json!({"type": ["object", "null"], "properties": {"x": {"$ref": "#"}}, "required": ["x"]}),
            json!({"type": "array", "items": {"$ref": "#"}}),
            json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties":
                {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["children"]}}}),
            json!({"type": "object", "properties": {"x": {"$ref": "#"}}, "required": ["x"],
                   "enum": [{"x": 1}]}),
            json!(true),
        ] {
            check_schema(&schema, "s", &SchemaLimits::DEFAULT)
                .unwrap_or_else(|e| panic!("{schema}: {e}"));
        }
    }

    fn ref_cycle_required(n: usize) -> Value {
        let mut defs = Map::new();
        for i in 0..n {
            defs.insert(
                format!("c{i}"),
                json!({"type": "object", "properties":
                {"x": {"$ref": format!("#/$defs/c{}", (i + 1) % n)}}, "required": ["x"]}),
            );
        }
        json!({"$ref": "#/$defs/c0", "$defs": defs})
    }

    #[test]
    fn patterns_are_bounded_by_what_they_expand_to() {
        for (pattern, size) in [
            ("^[0-9]{5}$", 5),
            (r"^\d{4}-\d{2}-\d{2}$", 10),
            ("a{100}", 100),
            ("(ab){3}", 6),
            ("^((a{100}){100}){100}$", 1_000_000),
            ("(a|b){2,8}", 16),
            ("x{2,}", 2),
            ("[{]{3}", 3),
            ("a{", 2),
            (r"\p{L}{10}", 10),
            ("((((", 0),
        ] {
            assert_eq!(pattern_expansion(pattern), size, "{pattern}");
        }
        assert_eq!(pattern_expansion("(a{99999999999}){99999999999}"), u64::MAX);
        let e = refused(&json!({"type": "string", "pattern": "^((a{100}){100}){100}$"}));
        assert!(e.contains("pattern expansion limit"), "{e}");
        let e = refused(&json!({"type": "object", "patternProperties": {"^(x{1000}){20}$": {}}}));
        assert!(e.contains("pattern expansion limit"), "{e}");
        check_schema(
            &json!({"type": "string", "pattern": "^[a-z]{1,64}@[a-z]{1,64}\\.[a-z]{2,8}$"}),
            "s",
            &SchemaLimits::DEFAULT,
        )
        .unwrap();
    }

    #[test]
    fn forbidden_constructs_are_named() {
        for (schema, needle) in [
            (
                json!({"type": "array", "uniqueItems": true, "x-guidance": {"lenient": true}}),
                "'x-guidance'",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "array", "x-guidance": {}}}}),
                "'x-guidance'",
            ),
            (
                json!({"$ref": "https://example.com/s.json"}),
                "not a reference within",
            ),
            (json!({"$ref": "#anchor"}), "names an anchor"),
            (
                json!({"properties": {"a": {"$id": "x", "type": "string"}}}),
                "'$id'",
            ),
            (json!({"$ref": 5}), "'$ref' must be a string"),
            (json!({"$dynamicRef": "#x"}), "'$dynamicRef'"),
        ] {
            let e = refused(&schema);
            assert!(e.contains(needle), "{schema}: {e}");
        }
        // A property may be called anything, and the root may have an `$id`.
        check_schema(
            &json!({"$id": "urn:x", "properties": {"x-guidance": {"type": "string"},
                     "$id": {"type": "string"}, "$ref": {"type": "string"}}}),
            "s",
            &SchemaLimits::DEFAULT,
        )
        .unwrap();
    }

    #[test]
    fn configurations_are_checked() {
        assert_eq!(RequestLimits::DEFAULT.validate(), Ok(()));
        let mut l = RequestLimits::DEFAULT;
        l.max_tools = 0;
        assert!(l.validate().unwrap_err().contains("max tools"));
        let mut l = RequestLimits::DEFAULT;
        l.schema.max_depth = SchemaLimits::MAX_DEPTH + 1;
        assert!(l.validate().unwrap_err().contains("at most 4096"));
    }
}
