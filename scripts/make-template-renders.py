#!/usr/bin/env python3
"""Renders every chat template of the pinned llama.cpp sdist (models/templates/*.jinja) with
Python's Jinja2 exactly as Hugging Face transformers renders chat templates
(`transformers.utils.chat_template_utils._compile_jinja_template`: an immutable sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `{% generation %}` blocks, and
the `tojson` / `raise_exception` / `strftime_now` helpers), for a fixed set of conversations,
and writes the expected texts (or that the template raised) to tests/data/template-renders.json.
The engine test `templates::every_template_renders_as_jinja2_does` compares the node's renders
with these.

  python3 -m venv /tmp/jvenv && /tmp/jvenv/bin/pip install jinja2==3.1.6
  /tmp/jvenv/bin/python scripts/make-template-renders.py "$(scripts/fetch-llama-cpp-sdist.sh --templates)"

The clock is fixed (`NOW`) so that `strftime_now` and `date_string` render the same every time.
"""
import json
import sys
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = datetime(2026, 1, 15, 10, 30, 0)
BOS, EOS = "<s>", "</s>"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {
    "id": "abc123XYZ",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
}
CONVERSATIONS = {
    "user": {"messages": [{"role": "user", "content": "Hello, who are you?"}]},
    "system": {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a sea."},
        ]
    },
    "multi_turn": {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a sea."},
            {"role": "assistant", "content": "The Baltic."},
            {"role": "user", "content": "Another one, with ünïcödé and \"quotes\"?"},
        ]
    },
    "tools_offered": {
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    },
    "tool_result": {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {
                "role": "tool",
                "tool_call_id": "abc123XYZ",
                "name": "get_weather",
                "content": "{\"temperature\": 18}",
            },
        ],
    },
}


class Generation(Extension):
    """transformers' AssistantTracker, not tracking: `{% generation %}` renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def compile_template(source):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return NOW.strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def main():
    folder = Path(sys.argv[1])
    out = {
        "generated_by": "scripts/make-template-renders.py",
        "jinja2": jinja2.__version__,
        "now": NOW.isoformat(),
        "bos_token": BOS,
        "eos_token": EOS,
        "conversations": CONVERSATIONS,
        "renders": {},
    }
    for path in sorted(folder.glob("*.jinja")):
        source = path.read_text(encoding="utf-8")
        renders = {}
        try:
            template = compile_template(source)
        except Exception as e:  # a template Jinja2 cannot even parse
            renders = {name: {"error": f"compile: {e}"} for name in CONVERSATIONS}
            out["renders"][path.name] = renders
            continue
        for name, conv in CONVERSATIONS.items():
            try:
                text = template.render(
                    messages=conv["messages"],
                    tools=conv.get("tools"),
                    add_generation_prompt=True,
                    bos_token=BOS,
                    eos_token=EOS,
                    date_string=NOW.strftime("%d %b %Y"),
                )
                renders[name] = {"text": text}
            except Exception as e:
                renders[name] = {"error": f"{type(e).__name__}: {e}"}
        out["renders"][path.name] = renders
    dest = Path(__file__).resolve().parent.parent / "tests/data/template-renders.json"
    dest.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    ok = sum("text" in r for t in out["renders"].values() for r in t.values())
    total = sum(len(t) for t in out["renders"].values())
    print(f"{len(out['renders'])} templates, {ok} of {total} renders, the rest raised -> {dest}")


if __name__ == "__main__":
    main()
