//! Chat templates: the model's own Jinja template, rendered with minijinja.

use crate::error::{EngineError, Result};
use crate::request::{ChatMessage, PromptInput};
use crate::tools::{Tool, ToolCalling};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};

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

fn strftime_now(format: String) -> std::result::Result<Value, JinjaError> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("invalid strftime format {format:?}"),
        ));
    }
    Ok(Value::from(
        chrono::Utc::now()
            .format_with_items(items.into_iter())
            .to_string(),
    ))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_trim_blocks(false);
        env.add_template_owned("chat", source.to_string())
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
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            date_string => chrono::Utc::now().format("%d %b %Y").to_string(),
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
