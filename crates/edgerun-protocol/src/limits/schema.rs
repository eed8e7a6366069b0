//! Measuring a caller's JSON schema before anything compiles it ([`check_schema`]): size and
//! node count in one iterative walk, depth and `$ref` depth as the heaviest path through the
//! graph of containers and `$ref`s with its cycles collapsed (Tarjan, iteratively), schemas no
//! finite JSON satisfies, and the constructs a schema may not hold (`x-guidance`, non-local
//! `$ref`s, a nested `$id`, patterns over [`MAX_PATTERN_EXPANSION`]). The limits and the
//! reasons are in the [parent's docs](super).

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use super::pattern::pattern_expansion;
use super::{SchemaLimits, MAX_PATTERN_EXPANSION};

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
