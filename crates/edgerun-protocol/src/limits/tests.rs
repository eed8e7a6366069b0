//! Tests of the schema measure, the pattern expansion bound and the limits' own checks.

use super::*;
use serde_json::{json, Map, Value};

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
