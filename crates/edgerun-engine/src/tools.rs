//! Tool calling: how a model family writes calls ([`ToolCallFormat`]), how the tools reach the
//! prompt, the grammar that forces a call, and reading calls back out of the text, whole
//! ([`ToolCalling::parse`]) or while it streams ([`ToolCallSplitter`]).
//!
//! The family is read off the chat template once ([`ToolCalling::detect`]):
//!
//! | template mentions | family | a call is written |
//! |---|---|---|
//! | `<tool_call>` (Hermes 2/3, Qwen 2.5/3, SmolLM3) | [`ToolCallFormat::Hermes`] | `<tool_call>{"name": .., "arguments": {..}}</tool_call>` |
//! | `[TOOL_CALLS]` (Mistral, Mistral Nemo) | [`ToolCallFormat::Mistral`] | `[TOOL_CALLS][{"name": .., "arguments": {..}}]` |
//! | `<\|python_tag\|>` or Llama-3 headers with `tools` (Llama 3.1/3.2/3.3) | [`ToolCallFormat::Llama3`] | `{"name": .., "parameters": {..}}` (after an optional `<\|python_tag\|>`) |
//!
//! A template that renders `tools` itself gets them (OpenAI's shape, arguments of calls sent back
//! as objects). One that does not (Llama-3-8B-Instruct's, ChatML) is not *native*: the tools are
//! described in a system message in the Hermes style, assistant calls sent back are written as
//! `<tool_call>` blocks and tool results as `<tool_response>` blocks in a user turn, and calls
//! are read in the Hermes format.
//!
//! `tool_choice: "required"` or a named function compile to a Lark grammar whose JSON parts are
//! the functions' parameter schemas ([`ToolCalling::grammar`]), so the arguments always validate.
//! A parameter schema's root moves when it is wrapped into the call's schema, so what its `$ref`s
//! point to is hoisted to the wrapper's root ([`hoist_definitions`]): each tool's schema becomes
//! `$defs["t<i>"]` and its own `$defs` / `definitions` `$defs["t<i>:$defs:<name>"]` /
//! `$defs["t<i>:definitions:<name>"]` (the prefix is the tool's index, so two tools' names never
//! clash), and every `$ref` in it is rewritten to match (`#` → `#/$defs/t<i>`, `#/$defs/X/..` →
//! `#/$defs/t<i>:$defs:X/..`, any other pointer `#/p` → `#/$defs/t<i>/p`). Pydantic's and zod's
//! schemas (`$defs` with `$ref`s to them) keep working when forced.
//! Special tokens are dropped from decoded text, so parsing never relies on them
//! (`<|python_tag|>`, `[TOOL_CALLS]` are control tokens in their vocabularies).

mod hoist;

use crate::constraint::OutputFormat;
use crate::request::ChatMessage;
use hoist::hoist_definitions;
use serde_json::{json, Value};

/// A function the model may call, as the caller defined it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// At least one call, to any tool (forced by a grammar).
    Required,
    /// A call to the named tool (forced by a grammar).
    Function(String),
}

/// A call read from the output.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3,
    Mistral,
}

/// A model's tool-calling convention (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolCalling {
    pub format: ToolCallFormat,
    /// The chat template renders `tools` itself.
    pub native: bool,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Options that keep forced JSON compact (see `constraint.rs`).
fn compact(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false}),
        );
    }
    schema
}

impl ToolCalling {
    /// Reads the family off a chat template's source.
    pub fn detect(template: &str) -> Self {
        let renders_tools = template.contains("tools");
        let (format, marker) = if template.contains(OPEN) {
            (ToolCallFormat::Hermes, true)
        } else if template.contains("[TOOL_CALLS]") {
            (ToolCallFormat::Mistral, true)
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("parameters"))
        {
            (ToolCallFormat::Llama3, true)
        } else {
            (ToolCallFormat::Hermes, false)
        };
        Self {
            format,
            native: marker && renders_tools,
        }
    }

    /// The tools in the shape chat templates read (OpenAI's).
    pub fn template_tools(tools: &[Tool]) -> Value {
        Value::Array(
            tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {
                        "name": t.name, "description": t.description, "parameters": t.parameters}})
                })
                .collect(),
        )
    }

    /// For a template that does not render tools: the conversation with the tools described in
    /// the system message (or, for a template without a system role, such as Gemma's, at the
    /// start of the first user message), calls and results written as Hermes blocks.
    pub fn rewrite_for_plain_template(
        tools: &[Tool],
        messages: &[ChatMessage],
        system_role: bool,
    ) -> Vec<ChatMessage> {
        let mut listing = String::new();
        for t in Self::template_tools(tools).as_array().into_iter().flatten() {
            listing.push_str(&t.to_string());
            listing.push('\n');
        }
        let prompt = format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n{listing}</tools>\n\n\
             For each function call, return a json object with function name and arguments \
             within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
        );
        let mut out = Vec::with_capacity(messages.len() + 1);
        let system = match messages.first() {
            Some(first) if first.role == "system" => format!("{}\n\n{prompt}", first.content),
            _ => prompt,
        };
        let skip = usize::from(messages.first().is_some_and(|m| m.role == "system"));
        let mut pending = Some(system);
        if system_role {
            out.push(ChatMessage::new(
                "system",
                pending.take().unwrap_or_default(),
            ));
        }
        for m in &messages[skip..] {
            if m.role == "user" {
                if let Some(system) = pending.take() {
                    out.push(ChatMessage::new(
                        "user",
                        format!("{system}\n\n{}", m.content),
                    ));
                    continue;
                }
            }
            match m.role.as_str() {
                "assistant" if m.tool_calls.is_some() => {
                    let mut content = m.content.clone();
                    for call in m
                        .tool_calls
                        .as_ref()
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let f = &call["function"];
                        let body = json!({"name": f["name"], "arguments": f["arguments"]});
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        content.push_str(&format!("{OPEN}\n{body}\n{CLOSE}"));
                    }
                    out.push(ChatMessage::new("assistant", content));
                }
                "tool" => out.push(ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", m.content),
                )),
                _ => out.push(m.clone()),
            }
        }
        out
    }

    /// The grammar that forces a call (`None` for [`ToolChoice::Auto`]).
    pub fn grammar(&self, tools: &[Tool], choice: &ToolChoice) -> Option<OutputFormat> {
        let chosen: Vec<&Tool> = match choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => tools.iter().collect(),
            ToolChoice::Function(name) => tools.iter().filter(|t| &t.name == name).collect(),
        };
        let args_key = match self.format {
            ToolCallFormat::Llama3 => "parameters",
            _ => "arguments",
        };
        let mut defs = serde_json::Map::new();
        let calls: Vec<Value> = chosen
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let arguments = hoist_definitions(&t.parameters, i, &mut defs);
                json!({"type": "object",
                       "properties": {"name": {"const": t.name}, args_key: arguments},
                       "required": ["name", args_key], "additionalProperties": false})
            })
            .collect();
        let one = json!({ "anyOf": calls });
        let root = match self.format {
            ToolCallFormat::Mistral => json!({"type": "array", "items": one, "minItems": 1}),
            _ => one,
        };
        let mut root = compact(root);
        if !defs.is_empty() {
            root["$defs"] = Value::Object(defs);
        }
        let lark = match self.format {
            ToolCallFormat::Hermes => {
                format!("start: \"{OPEN}\\n\" %json {} \"\\n{CLOSE}\"", root)
            }
            ToolCallFormat::Llama3 | ToolCallFormat::Mistral => format!("start: %json {root}"),
        };
        Some(OutputFormat::Lark(lark))
    }

    /// Splits a whole answer into its text and its calls. Text that looks like a call but does
    /// not parse stays text.
    pub fn parse(&self, text: &str) -> (String, Vec<ToolCall>) {
        match self.format {
            ToolCallFormat::Hermes => parse_hermes(text),
            ToolCallFormat::Llama3 | ToolCallFormat::Mistral => {
                let calls = parse_json_calls(text);
                if calls.is_empty() {
                    (text.to_string(), calls)
                } else {
                    (String::new(), calls)
                }
            }
        }
    }

    /// A splitter for a streamed answer.
    pub fn splitter(&self) -> ToolCallSplitter {
        ToolCallSplitter {
            calling: *self,
            held: String::new(),
            state: Split::Undecided,
        }
    }
}

/// One call object: `{"name", "arguments" | "parameters"}` (arguments as an object or a JSON
/// string).
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return None,
    };
    arguments
        .is_object()
        .then_some(ToolCall { name, arguments })
}

fn parse_hermes(text: &str) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        let body_start = at + OPEN.len();
        let (body, after) = match rest[body_start..].find(CLOSE) {
            Some(end) => (
                &rest[body_start..body_start + end],
                &rest[body_start + end + CLOSE.len()..],
            ),
            None => (&rest[body_start..], ""),
        };
        match serde_json::from_str::<Value>(body.trim())
            .ok()
            .as_ref()
            .and_then(call_of)
        {
            Some(call) => {
                content.push_str(&rest[..at]);
                calls.push(call);
            }
            // Not a call after all: kept as text.
            None => content.push_str(&rest[..body_start + body.len()]),
        }
        rest = after;
    }
    content.push_str(rest);
    let content = if calls.is_empty() {
        content
    } else {
        content.trim().to_string()
    };
    (content, calls)
}

/// Llama-3's `{"name", "parameters"}` (one, or several separated by `;`) and Mistral's
/// `[{"name", "arguments"}, ..]`, after an optional textual marker.
fn parse_json_calls(text: &str) -> Vec<ToolCall> {
    let t = text.trim();
    let t = t
        .strip_prefix("<|python_tag|>")
        .or_else(|| t.strip_prefix("[TOOL_CALLS]"))
        .unwrap_or(t)
        .trim();
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return match &v {
            Value::Array(items) => {
                let calls: Vec<ToolCall> = items.iter().filter_map(call_of).collect();
                if calls.len() == items.len() {
                    calls
                } else {
                    Vec::new()
                }
            }
            obj => call_of(obj).into_iter().collect(),
        };
    }
    let parts: Vec<Option<ToolCall>> = t
        .split(';')
        .map(|p| {
            serde_json::from_str::<Value>(p.trim())
                .ok()
                .as_ref()
                .and_then(call_of)
        })
        .collect();
    if parts.len() > 1 && parts.iter().all(Option::is_some) {
        parts.into_iter().flatten().collect()
    } else {
        Vec::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Nothing but whitespace seen (JSON families) or no tag yet (Hermes).
    Undecided,
    /// Plain text: everything passes through.
    Text,
    /// A call has started: everything is held for [`ToolCallSplitter::finish`].
    Calls,
}

/// Streams an answer's text while holding back what may be a tool call (see the module docs).
#[derive(Debug)]
pub struct ToolCallSplitter {
    calling: ToolCalling,
    held: String,
    state: Split,
}

impl ToolCallSplitter {
    /// Takes the next text; returns what can be shown now.
    pub fn push(&mut self, text: &str) -> String {
        match self.state {
            Split::Text => return text.to_string(),
            Split::Calls => {
                self.held.push_str(text);
                return String::new();
            }
            Split::Undecided => self.held.push_str(text),
        }
        match self.calling.format {
            ToolCallFormat::Hermes => {
                if let Some(at) = self.held.find(OPEN) {
                    let out = self.held[..at].to_string();
                    self.held.drain(..at);
                    self.state = Split::Calls;
                    return out;
                }
                // Hold a tail that could be the start of the tag.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&n| {
                        self.held.len() >= n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && OPEN.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                let out = self.held[..cut].to_string();
                self.held.drain(..cut);
                out
            }
            ToolCallFormat::Llama3 | ToolCallFormat::Mistral => {
                let start = self.held.trim_start();
                if start.is_empty() {
                    return String::new();
                }
                if start.starts_with(['{', '['])
                    || "<|python_tag|>".starts_with(start)
                    || start.starts_with("<|python_tag|>")
                    || "[TOOL_CALLS]".starts_with(start)
                    || start.starts_with("[TOOL_CALLS]")
                {
                    self.state = Split::Calls;
                    String::new()
                } else {
                    self.state = Split::Text;
                    std::mem::take(&mut self.held)
                }
            }
        }
    }

    /// The end of the answer: the text still held that is not a call, and the calls.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        self.calling.parse(&self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::hoist::rewritten;
    use super::*;

    fn tools() -> Vec<Tool> {
        vec![Tool {
            name: "get_weather".into(),
            description: "Weather in a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}),
        }]
    }

    #[test]
    fn families_are_read_off_real_templates() {
        let hermes = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}<tool_call>";
        assert_eq!(
            ToolCalling::detect(hermes),
            ToolCalling {
                format: ToolCallFormat::Hermes,
                native: true
            }
        );
        let llama31 = "{%- if tools is not none %}<|start_header_id|>ipython{\"name\": function name, \"parameters\": ...}<|python_tag|>";
        assert_eq!(ToolCalling::detect(llama31).format, ToolCallFormat::Llama3);
        assert!(ToolCalling::detect(llama31).native);
        let mistral =
            "{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        assert_eq!(ToolCalling::detect(mistral).format, ToolCallFormat::Mistral);
        let plain = crate::CHATML_TEMPLATE;
        assert_eq!(
            ToolCalling::detect(plain),
            ToolCalling {
                format: ToolCallFormat::Hermes,
                native: false
            }
        );
        // Llama-3-8B-Instruct's template has headers but no tools.
        let llama3 = "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>{% endfor %}";
        assert!(!ToolCalling::detect(llama3).native);
    }

    #[test]
    fn hermes_calls_parse_whole_and_keep_the_text_around_them() {
        let c = ToolCalling {
            format: ToolCallFormat::Hermes,
            native: true,
        };
        let (text, calls) = c.parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}</tool_call>",
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, json!({"city": "Paris"}));
        assert_eq!(calls[1].arguments, json!({"city": "Oslo"}));
        // A broken call stays text: nothing the model wrote is lost.
        let (text, calls) = c.parse("x <tool_call>{not json</tool_call>");
        assert!(calls.is_empty());
        assert_eq!(text, "x <tool_call>{not json");
    }

    #[test]
    fn llama3_and_mistral_calls_parse() {
        let l = ToolCalling {
            format: ToolCallFormat::Llama3,
            native: true,
        };
        let (text, calls) =
            l.parse("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}");
        assert_eq!((text.as_str(), calls[0].name.as_str()), ("", "get_weather"));
        assert_eq!(l.parse("<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {}}").1.len(), 2);
        assert_eq!(
            l.parse("The answer is {not a call}").0,
            "The answer is {not a call}"
        );
        let m = ToolCalling {
            format: ToolCallFormat::Mistral,
            native: true,
        };
        let calls = m.parse("[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]").1;
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, json!({"x": 1}));
        assert!(m.parse("[1, 2]").1.is_empty());
    }

    #[test]
    fn the_splitter_streams_text_and_holds_calls() {
        let h = ToolCalling {
            format: ToolCallFormat::Hermes,
            native: false,
        };
        let mut s = h.splitter();
        let mut shown = String::new();
        for piece in [
            "Sure",
            ", <tool",
            "_ca",
            "ll>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ] {
            shown.push_str(&s.push(piece));
        }
        assert_eq!(shown, "Sure, ");
        let (tail, calls) = s.finish();
        assert_eq!((tail.as_str(), calls.len()), ("", 1));
        // A tag prefix that turns out to be text is released.
        let mut s = h.splitter();
        assert_eq!(s.push("a <tool"), "a ");
        assert_eq!(s.push("box> b"), "<toolbox> b");

        let l = ToolCalling {
            format: ToolCallFormat::Llama3,
            native: true,
        };
        let mut s = l.splitter();
        assert_eq!(s.push("  "), "");
        assert_eq!(s.push("{\"name\": \"get_weather\","), "");
        assert_eq!(s.push(" \"parameters\": {\"city\": \"Rome\"}}"), "");
        assert_eq!(s.finish().1.len(), 1);
        let mut s = l.splitter();
        assert_eq!(s.push(" Hello"), " Hello");
        assert_eq!(s.push(" there"), " there");
        assert_eq!(s.finish(), (String::new(), vec![]));
        // Held JSON that is no call comes out at the end.
        let mut s = l.splitter();
        assert_eq!(s.push("{\"a\": 1}"), "");
        assert_eq!(s.finish(), ("{\"a\": 1}".to_string(), vec![]));
    }

    #[test]
    fn plain_templates_get_the_tools_in_the_system_message() {
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(
                    json!([{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
                ),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("1".into()),
                ..ChatMessage::new("tool", "sunny")
            },
        ];
        let out = ToolCalling::rewrite_for_plain_template(&tools(), &messages, true);
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert!(out[0].content.contains("\"name\":\"get_weather\""));
        let call = out[2]
            .content
            .strip_prefix("<tool_call>\n")
            .unwrap()
            .strip_suffix("\n</tool_call>")
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(call).unwrap(),
            json!({"name": "get_weather", "arguments": {"city": "Paris"}})
        );
        assert_eq!(
            (out[3].role.as_str(), out[3].content.as_str()),
            ("user", "<tool_response>\nsunny\n</tool_response>")
        );
        // Without a system role, the first user turn carries it.
        let out = ToolCalling::rewrite_for_plain_template(&tools(), &messages, false);
        assert_eq!(out.len(), 3);
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert!(out[0]
            .content
            .ends_with("</tool_call>\n\nWeather in Paris?"));
        assert_eq!(out[0].role, "user");
    }

    /// The JSON of a forced-call grammar (after `%json`, before the closing text).
    fn grammar_json(g: &str) -> Value {
        let start = g.find("%json ").unwrap() + "%json ".len();
        let mut de = serde_json::Deserializer::from_str(&g[start..]).into_iter::<Value>();
        de.next().unwrap().unwrap()
    }

    #[test]
    fn forced_calls_keep_their_definitions() {
        // Two Pydantic-style tools whose `$defs` share a name: each keeps its own.
        let addr = |field: &str| {
            json!({"type": "object", "properties": {"addr": {"$ref": "#/$defs/Addr"}},
                   "required": ["addr"],
                   "$defs": {"Addr": {"type": "object", "properties": {field: {"type": "string"}},
                                      "required": [field], "additionalProperties": false}}})
        };
        let tools = vec![
            Tool {
                name: "ship".into(),
                description: String::new(),
                parameters: addr("street"),
            },
            Tool {
                name: "bill".into(),
                description: String::new(),
                parameters: addr("iban"),
            },
            tools()[0].clone(),
        ];
        let h = ToolCalling {
            format: ToolCallFormat::Hermes,
            native: true,
        };
        let Some(OutputFormat::Lark(g)) = h.grammar(&tools, &ToolChoice::Required) else {
            panic!()
        };
        let root = grammar_json(&g);
        let defs = root["$defs"].as_object().unwrap();
        let mut keys: Vec<&str> = defs.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["t0", "t0:$defs:Addr", "t1", "t1:$defs:Addr"]);
        assert_eq!(
            defs["t0"]["properties"]["addr"]["$ref"],
            "#/$defs/t0:$defs:Addr"
        );
        assert_eq!(defs["t1:$defs:Addr"]["required"], json!(["iban"]));
        assert!(defs["t0"].get("$defs").is_none());
        let calls = root["anyOf"].as_array().unwrap();
        assert_eq!(
            calls[0]["properties"]["arguments"],
            json!({"$ref": "#/$defs/t0"})
        );
        // A tool without references is embedded as it is.
        assert_eq!(calls[2]["properties"]["arguments"], tools[2].parameters);
        // Every pointer lands on what it pointed to before.
        for (before, after) in [
            ("#", "#/$defs/t3"),
            ("#/$defs/A", "#/$defs/t3:$defs:A"),
            ("#/$defs/A/properties/x", "#/$defs/t3:$defs:A/properties/x"),
            ("#/definitions/B", "#/$defs/t3:definitions:B"),
            ("#/properties/y", "#/$defs/t3/properties/y"),
            ("https://x/y", "https://x/y"),
        ] {
            assert_eq!(rewritten(before, "t3"), after);
        }
        // Data that looks like a reference is data.
        let mut defs = serde_json::Map::new();
        let schema = json!({"$defs": {}, "const": {"$ref": "#/keep"}, "properties":
                            {"a": {"enum": [{"$ref": "#"}]}, "b": {"$ref": "#"}}});
        hoist_definitions(&schema, 0, &mut defs);
        assert_eq!(defs["t0"]["const"]["$ref"], "#/keep");
        assert_eq!(defs["t0"]["properties"]["a"]["enum"][0]["$ref"], "#");
        assert_eq!(defs["t0"]["properties"]["b"]["$ref"], "#/$defs/t0");
    }

    #[test]
    fn forced_calls_compile_to_each_familys_grammar() {
        let h = ToolCalling {
            format: ToolCallFormat::Hermes,
            native: true,
        };
        let Some(OutputFormat::Lark(g)) = h.grammar(&tools(), &ToolChoice::Required) else {
            panic!()
        };
        assert!(g.starts_with("start: \"<tool_call>\\n\" %json {"), "{g}");
        assert!(g.contains("\"const\":\"get_weather\""), "{g}");
        assert!(h.grammar(&tools(), &ToolChoice::Auto).is_none());
        let l = ToolCalling {
            format: ToolCallFormat::Llama3,
            native: true,
        };
        let Some(OutputFormat::Lark(g)) =
            l.grammar(&tools(), &ToolChoice::Function("get_weather".into()))
        else {
            panic!()
        };
        assert!(g.contains("\"parameters\""), "{g}");
    }
}
