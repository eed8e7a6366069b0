//! Tool calling against real chat templates (llama.cpp's test set, from the pinned
//! llama-cpp-python sdist: `scripts/fetch-llama-cpp-sdist.sh --templates`): each family is
//! recognised, a whole tool conversation (tools, an assistant call, its result) renders, and
//! what the family's models write parses back into the call.

use edgerun_engine::{
    ChatMessage, ChatTemplate, PromptInput, Tool, ToolCallFormat, ToolCalling, ToolChoice,
};
use serde_json::json;

fn tools() -> Vec<Tool> {
    vec![Tool {
        name: "get_weather".into(),
        description: "Current weather in a city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}),
    }]
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are helpful."),
        ChatMessage::new("user", "Weather in Paris?"),
        ChatMessage {
            // Mistral's templates insist on 9 alphanumeric characters.
            tool_calls: Some(json!([{"id": "abcDEF123", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])),
            ..ChatMessage::new("assistant", "")
        },
        ChatMessage {
            tool_call_id: Some("abcDEF123".into()),
            name: Some("get_weather".into()),
            ..ChatMessage::new("tool", "{\"celsius\": 21}")
        },
    ]
}

/// (template file, family, renders tools itself, what such a model writes for a call)
const CASES: &[(&str, ToolCallFormat, bool, &str)] = &[
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", ToolCallFormat::Llama3, true,
     "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", ToolCallFormat::Llama3, true,
     "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", ToolCallFormat::Llama3, true,
     "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
    ("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", ToolCallFormat::Hermes, true,
     "<tool_call>\n{\"arguments\": {\"city\": \"Paris\"}, \"name\": \"get_weather\"}\n</tool_call>"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", ToolCallFormat::Hermes, true,
     "<tool_call>\n{\"arguments\": {\"city\": \"Paris\"}, \"name\": \"get_weather\"}\n</tool_call>"),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", ToolCallFormat::Hermes, true,
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
    ("Qwen-Qwen3-0.6B.jinja", ToolCallFormat::Hermes, true,
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
    // `[TOOL_CALLS]` is a control token there: decoded text starts at the JSON.
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", ToolCallFormat::Mistral, true,
     "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"),
    // No tool support in the template: described in the system message, Hermes calls.
    ("google-gemma-2-2b-it.jinja", ToolCallFormat::Hermes, false,
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
];

#[test]
fn real_templates_render_tool_conversations_and_their_calls_parse() {
    let dir = crate::harness::sdist_dir("--templates");
    for &(file, format, native, output) in CASES {
        let source =
            std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let template = ChatTemplate::new(&source, Some("<s>"), Some("</s>")).unwrap();
        let calling = template.tool_calling();
        assert_eq!(calling, ToolCalling { format, native }, "{file}");

        let text = template
            .render_with_tools(&PromptInput::Messages(conversation()), &tools())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            text.contains("get_weather"),
            "{file}: the tools are not in\n{text}"
        );
        assert!(
            text.contains("Current weather in a city"),
            "{file}:\n{text}"
        );
        assert!(
            text.contains("21"),
            "{file}: the tool result is not in\n{text}"
        );
        assert!(text.contains("Paris"), "{file}: the call is not in\n{text}");

        let (rest, calls) = calling.parse(output);
        assert_eq!(rest, "", "{file}");
        assert_eq!(calls.len(), 1, "{file}");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, json!({"city": "Paris"}));
        // A forced call compiles to this family's grammar.
        assert!(calling.grammar(&tools(), &ToolChoice::Required).is_some());
    }
}
