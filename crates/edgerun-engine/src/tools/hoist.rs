//! Hoisting a tool's parameter schema into the forcing grammar's schema: each tool's schema
//! becomes `$defs["t<i>"]`, its own definitions move beside it under per-tool names, and every
//! `$ref` in it is rewritten to match (the rules are in the parent module's docs). Works on
//! `serde_json` values alone, iteratively, whatever the caller's nesting.

use serde_json::{json, Value};

/// Keywords whose values are data, never schemas: a `$ref` inside them is not a reference.
const DATA_KEYWORDS: [&str; 4] = ["const", "enum", "default", "examples"];

/// Tool `index`'s parameter schema as the call's schema embeds it (see the module docs): when
/// it has definitions or `$ref`s, a `$ref` to its hoisted copy, and the copy (without its
/// `$defs` / `definitions`, which are hoisted beside it) plus its definitions go into `defs`,
/// every `$ref` rewritten. A schema with neither is embedded as it is. Iterative: never recurses
/// over the caller's nesting.
pub(super) fn hoist_definitions(
    schema: &Value,
    index: usize,
    defs: &mut serde_json::Map<String, Value>,
) -> Value {
    let prefix = format!("t{index}");
    let has_refs = |v: &Value| {
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(m) => {
                    if m.contains_key("$ref") || m.contains_key("$defs") {
                        return true;
                    }
                    stack.extend(
                        m.iter()
                            .filter(|(k, _)| !DATA_KEYWORDS.contains(&k.as_str()))
                            .map(|(_, v)| v),
                    );
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
        false
    };
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    if !has_refs(schema) && !map.contains_key("definitions") {
        return schema.clone();
    }
    let mut root = map.clone();
    let mut hoisted = Vec::new();
    for kind in ["$defs", "definitions"] {
        if let Some(Value::Object(inner)) = root.remove(kind) {
            for (name, def) in inner {
                hoisted.push((format!("{prefix}:{kind}:{name}"), def));
            }
        }
    }
    hoisted.push((prefix.clone(), Value::Object(root)));
    for (key, mut def) in hoisted {
        rewrite_refs(&mut def, &prefix);
        defs.insert(key, def);
    }
    json!({ "$ref": format!("#/$defs/{prefix}") })
}

/// Rewrites every `$ref` in `schema` (outside data keywords) for a schema hoisted under
/// `$defs[prefix]` (see [`hoist_definitions`]). References that are not local pointers are left
/// alone (the wire layer refuses them).
fn rewrite_refs(schema: &mut Value, prefix: &str) {
    let mut stack = vec![schema];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                for (key, child) in m.iter_mut() {
                    if key == "$ref" {
                        if let Value::String(r) = child {
                            *r = rewritten(r, prefix);
                        }
                    } else if !DATA_KEYWORDS.contains(&key.as_str()) {
                        stack.push(child);
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            _ => {}
        }
    }
}

/// One `$ref` of a schema hoisted under `$defs[prefix]`.
pub(super) fn rewritten(reference: &str, prefix: &str) -> String {
    let Some(fragment) = reference.strip_prefix('#') else {
        return reference.to_string();
    };
    if fragment.is_empty() {
        return format!("#/$defs/{prefix}");
    }
    for kind in ["$defs", "definitions"] {
        if let Some(rest) = fragment.strip_prefix(&format!("/{kind}/")) {
            // `rest` is the definition's (escaped) name, then maybe a pointer into it.
            return format!("#/$defs/{prefix}:{kind}:{rest}");
        }
    }
    match fragment.strip_prefix('/') {
        Some(pointer) => format!("#/$defs/{prefix}/{pointer}"),
        None => reference.to_string(),
    }
}
