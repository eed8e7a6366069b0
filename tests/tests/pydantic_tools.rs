//! Pydantic-style tools on the real model: the schemas the OpenAI Python
//! SDK's `openai.pydantic_function_tool(Model)` emits for five realistic models — nested models
//! behind `$defs` / `$ref`, enums as their own definitions, `Optional[...]` as `anyOf` with
//! `null`, lists of models, `additionalProperties: false` and every property `required`
//! (strict mode), and the bounds `Field(max_length=.., ge=.., le=..)` adds (`maxLength`,
//! `maxItems`, `minimum`, `maximum`: they keep a 135M model's answers short) — written out here
//! by hand. Forced by name, forced with `"required"` and
//! offered with `"auto"`; every forced call's arguments are validated by an independent
//! validator (the `jsonschema` crate) against the tool's own schema. Before the fix a forced
//! tool lost its `$defs` when wrapped into the call grammar: 400 "Pointer '/$defs/..' does
//! not exist".

use edgerun_e2e::{Node, MODEL_ALIAS};
use serde_json::{json, Value};

/// `class GetWeather(BaseModel): city: str; unit: Unit; days: Optional[int]` with
/// `class Unit(str, Enum)`.
fn get_weather() -> Value {
    json!({"type": "function", "function": {"name": "GetWeather", "strict": true,
        "description": "Weather forecast for a city.",
        "parameters": {
            "$defs": {"Unit": {"enum": ["celsius", "fahrenheit"], "title": "Unit", "type": "string"}},
            "properties": {
                "city": {"maxLength": 16, "title": "City", "type": "string"},
                "unit": {"$ref": "#/$defs/Unit"},
                "days": {"anyOf": [{"maximum": 14, "minimum": 1, "type": "integer"}, {"type": "null"}], "title": "Days"}},
            "required": ["city", "unit", "days"],
            "title": "GetWeather", "type": "object", "additionalProperties": false}}})
}

/// `CreateOrder(customer: Customer, items: List[LineItem], shipping: Optional[Address],
/// priority: Priority)`.
fn create_order() -> Value {
    json!({"type": "function", "function": {"name": "CreateOrder", "strict": true,
        "description": "Place an order for a customer.",
        "parameters": {
            "$defs": {
                "Address": {"properties": {
                        "street": {"maxLength": 16, "title": "Street", "type": "string"},
                        "city": {"maxLength": 16, "title": "City", "type": "string"},
                        "zip": {"maxLength": 16, "title": "Zip", "type": "string"}},
                    "required": ["street", "city", "zip"], "title": "Address", "type": "object",
                    "additionalProperties": false},
                "Customer": {"properties": {
                        "name": {"maxLength": 16, "title": "Name", "type": "string"},
                        "email": {"maxLength": 16, "title": "Email", "type": "string"}},
                    "required": ["name", "email"], "title": "Customer", "type": "object",
                    "additionalProperties": false},
                "LineItem": {"properties": {
                        "sku": {"maxLength": 16, "title": "Sku", "type": "string"},
                        "quantity": {"maximum": 100, "minimum": 1, "title": "Quantity", "type": "integer"}},
                    "required": ["sku", "quantity"], "title": "LineItem", "type": "object",
                    "additionalProperties": false},
                "Priority": {"enum": ["low", "normal", "high"], "title": "Priority", "type": "string"}},
            "properties": {
                "customer": {"$ref": "#/$defs/Customer"},
                "items": {"items": {"$ref": "#/$defs/LineItem"}, "maxItems": 3, "title": "Items", "type": "array"},
                "shipping": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
                "priority": {"$ref": "#/$defs/Priority"}},
            "required": ["customer", "items", "shipping", "priority"],
            "title": "CreateOrder", "type": "object", "additionalProperties": false}}})
}

/// `ScheduleMeeting(title: str, attendees: List[Person], location: Optional[Location],
/// duration_minutes: int)`, `Location(kind: LocationKind, detail: str)`.
fn schedule_meeting() -> Value {
    json!({"type": "function", "function": {"name": "ScheduleMeeting", "strict": true,
        "description": "Schedule a meeting.",
        "parameters": {
            "$defs": {
                "Location": {"properties": {
                        "kind": {"$ref": "#/$defs/LocationKind"},
                        "detail": {"maxLength": 16, "title": "Detail", "type": "string"}},
                    "required": ["kind", "detail"], "title": "Location", "type": "object",
                    "additionalProperties": false},
                "LocationKind": {"enum": ["room", "video"], "title": "LocationKind", "type": "string"},
                "Person": {"properties": {
                        "name": {"maxLength": 16, "title": "Name", "type": "string"},
                        "email": {"anyOf": [{"maxLength": 16, "type": "string"}, {"type": "null"}], "title": "Email"}},
                    "required": ["name", "email"], "title": "Person", "type": "object",
                    "additionalProperties": false}},
            "properties": {
                "title": {"maxLength": 16, "title": "Title", "type": "string"},
                "attendees": {"items": {"$ref": "#/$defs/Person"}, "maxItems": 3, "title": "Attendees", "type": "array"},
                "location": {"anyOf": [{"$ref": "#/$defs/Location"}, {"type": "null"}]},
                "duration_minutes": {"maximum": 480, "minimum": 5, "title": "Duration Minutes", "type": "integer"}},
            "required": ["title", "attendees", "location", "duration_minutes"],
            "title": "ScheduleMeeting", "type": "object", "additionalProperties": false}}})
}

/// `SearchFlights(origin: Airport, destination: Airport, passengers: List[Passenger],
/// cabin: Cabin)`, `Passenger(name: str, age_group: AgeGroup)`.
fn search_flights() -> Value {
    json!({"type": "function", "function": {"name": "SearchFlights", "strict": true,
        "description": "Search flights between two airports.",
        "parameters": {
            "$defs": {
                "AgeGroup": {"enum": ["adult", "child", "infant"], "title": "AgeGroup", "type": "string"},
                "Airport": {"properties": {
                        "code": {"maxLength": 16, "title": "Code", "type": "string"},
                        "city": {"maxLength": 16, "title": "City", "type": "string"}},
                    "required": ["code", "city"], "title": "Airport", "type": "object",
                    "additionalProperties": false},
                "Cabin": {"enum": ["economy", "business", "first"], "title": "Cabin", "type": "string"},
                "Passenger": {"properties": {
                        "name": {"maxLength": 16, "title": "Name", "type": "string"},
                        "age_group": {"$ref": "#/$defs/AgeGroup"}},
                    "required": ["name", "age_group"], "title": "Passenger", "type": "object",
                    "additionalProperties": false}},
            "properties": {
                "origin": {"$ref": "#/$defs/Airport"},
                "destination": {"$ref": "#/$defs/Airport"},
                "passengers": {"items": {"$ref": "#/$defs/Passenger"}, "maxItems": 3, "title": "Passengers", "type": "array"},
                "cabin": {"$ref": "#/$defs/Cabin"}},
            "required": ["origin", "destination", "passengers", "cabin"],
            "title": "SearchFlights", "type": "object", "additionalProperties": false}}})
}

/// `UpdateProfile(user_id: str, address: Address, tags: List[str], notify: bool)` where
/// `Address` nests `Geo` (a `$ref` inside a definition).
fn update_profile() -> Value {
    json!({"type": "function", "function": {"name": "UpdateProfile", "strict": true,
        "description": "Update a user's profile.",
        "parameters": {
            "$defs": {
                "Address": {"properties": {
                        "street": {"maxLength": 16, "title": "Street", "type": "string"},
                        "geo": {"anyOf": [{"$ref": "#/$defs/Geo"}, {"type": "null"}]}},
                    "required": ["street", "geo"], "title": "Address", "type": "object",
                    "additionalProperties": false},
                "Geo": {"properties": {
                        "lat": {"maximum": 90, "minimum": -90, "title": "Lat", "type": "number"},
                        "lon": {"maximum": 180, "minimum": -180, "title": "Lon", "type": "number"}},
                    "required": ["lat", "lon"], "title": "Geo", "type": "object",
                    "additionalProperties": false}},
            "properties": {
                "user_id": {"maxLength": 16, "title": "User Id", "type": "string"},
                "address": {"$ref": "#/$defs/Address"},
                "tags": {"items": {"maxLength": 16, "type": "string"}, "maxItems": 3, "title": "Tags", "type": "array"},
                "notify": {"title": "Notify", "type": "boolean"}},
            "required": ["user_id", "address", "tags", "notify"],
            "title": "UpdateProfile", "type": "object", "additionalProperties": false}}})
}

fn tools() -> Vec<(Value, &'static str)> {
    vec![
        (get_weather(), "What will the weather be in Oslo for the next 3 days, in celsius?"),
        (create_order(), "Order 2 of sku A-1 for Ann (ann@example.com), ship to 1 Main St, Springfield, 12345, high priority."),
        (schedule_meeting(), "Schedule a 30 minute video call called Sync with Bob and Eve."),
        (search_flights(), "Find business flights from JFK New York to CDG Paris for one adult, Sam."),
        (update_profile(), "Update user u42: address 5 Elm St, tags vip, notify them."),
    ]
}

/// The tool's `parameters`, to validate its calls' arguments with.
fn validator(tool: &Value) -> jsonschema::Validator {
    let schema = &tool["function"]["parameters"];
    jsonschema::validator_for(schema).unwrap_or_else(|e| panic!("{schema}: {e}"))
}

fn name(tool: &Value) -> &str {
    tool["function"]["name"].as_str().unwrap()
}

/// The calls of an OpenAI chat completion: (name, parsed arguments).
fn openai_calls(v: &Value) -> Vec<(String, Value)> {
    v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {v}"))
        .iter()
        .map(|c| {
            let args = c["function"]["arguments"].as_str().unwrap();
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {args}")),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pydantic_tools_forced_by_name_call_with_valid_arguments() {
    let node = Node::start(&[]).await;
    for (tool, question) in tools() {
        let body = json!({"model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": question}],
            "tools": [tool.clone()],
            "tool_choice": {"type": "function", "function": {"name": name(&tool)}},
            "temperature": 0, "max_tokens": 500});
        let resp = node.post_json_to("/v1/chat/completions", &body).await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{}: {v}", name(&tool));
        let calls = openai_calls(&v);
        assert_eq!(calls.len(), 1, "{v}");
        assert_eq!(calls[0].0, name(&tool));
        let validator = validator(&tool);
        assert!(
            validator.is_valid(&calls[0].1),
            "{}: {} does not validate: {:?}",
            name(&tool),
            calls[0].1,
            validator
                .iter_errors(&calls[0].1)
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pydantic_tools_all_offered_required_and_auto() {
    let node = Node::start(&[]).await;
    let all: Vec<Value> = tools().into_iter().map(|(t, _)| t).collect();
    let question = tools()[1].1;
    // Required, on Workers AI's route (the OpenAI tool shape it takes too): whichever tool is
    // called, its arguments validate against that tool's schema.
    let body = json!({"messages": [{"role": "user", "content": question}],
        "tools": all, "tool_choice": "required", "temperature": 0, "max_tokens": 500});
    let resp = node.post(body.to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    let calls = v["result"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(!calls.is_empty(), "{v}");
    for call in calls {
        let tool = all
            .iter()
            .find(|t| name(t) == call["name"])
            .unwrap_or_else(|| panic!("a call to no tool: {call}"));
        assert!(
            validator(tool).is_valid(&call["arguments"]),
            "{call} does not validate"
        );
    }
    // Auto: the tools (with their definitions) reach the prompt; the model decides.
    let body = json!({"model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": question}],
        "tools": all, "tool_choice": "auto", "temperature": 0, "max_tokens": 120});
    let resp = node
        .post_json_to("/client/v4/accounts/acc/ai/v1/chat/completions", &body)
        .await;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion", "{v}");
    // Whatever the model chose: a call names a tool and its arguments are JSON.
    if let Some(calls) = v["choices"][0]["message"]["tool_calls"].as_array() {
        for (called, _) in openai_calls(&v) {
            assert!(all.iter().any(|t| name(t) == called), "{v}");
        }
        assert!(!calls.is_empty());
    }
}
