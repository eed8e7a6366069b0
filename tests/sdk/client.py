"""Drives an edgerun node with the official `openai` Python SDK (installed by
scripts/install-sdk-clients.sh; run by tests/tests/openai.rs, which starts the node).

Environment: EDGERUN_BASE_URL (the SDK's base_url: .../v1 or .../client/v4/accounts/{id}/ai/v1),
EDGERUN_API_KEY, EDGERUN_MODEL, EDGERUN_FAMILY (`v1`, or `workers-ai`: Workers AI's own route,
which has only chat completions, as the service does). Prints `ok <check>` per check and exits
non-zero at the first failure.
"""

import os
import sys

import json
import openai

BASE = os.environ["EDGERUN_BASE_URL"]
KEY = os.environ["EDGERUN_API_KEY"]
MODEL = os.environ["EDGERUN_MODEL"]
V1 = os.environ["EDGERUN_FAMILY"] == "v1"

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


def ok(name):
    print(f"ok {name}", flush=True)


def expect_error(name, kind, status, call):
    try:
        call()
    except kind as e:
        assert e.status_code == status, (name, e.status_code, e)
        ok(name)
        return e
    raise AssertionError(f"{name}: no {kind.__name__} raised")


# Chat, not streamed.
chat = client.chat.completions.create(
    model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, seed=1
)
assert chat.object == "chat.completion", chat
choice = chat.choices[0]
assert choice.index == 0 and choice.message.role == "assistant", chat
assert choice.message.content, chat
assert choice.finish_reason in ("stop", "length"), chat
assert chat.model == MODEL and chat.id.startswith("chatcmpl-"), chat
u = chat.usage
assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 24, u
ok("chat")

# Chat, streamed, with the usage chunk: the same greedy text.
chunks = list(
    client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == choice.message.content, (text, choice.message.content)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [choice.finish_reason], finishes
last = chunks[-1]
assert last.choices == [] and last.usage is not None, last
assert last.usage.completion_tokens == u.completion_tokens, (last.usage, u)
assert all(c.usage is None for c in chunks[:-1])
ok("chat stream with usage")

# Log-probabilities, parsed into the SDK's types.
lp = client.chat.completions.create(
    model=MODEL, messages=MESSAGES, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
)
content = lp.choices[0].logprobs.content
assert len(content) >= 1, lp
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 3, t
    assert t.top_logprobs[0].token == t.token, t  # greedy: the chosen token is the likeliest
assert "".join(t.token for t in content) == lp.choices[0].message.content
ok("chat logprobs")

# Stop strings.
stopped = client.chat.completions.create(
    model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, stop=["Oranges"]
)
assert stopped.choices[0].finish_reason == "stop", stopped
assert "Oranges" not in stopped.choices[0].message.content, stopped
ok("chat stop")

# A forced tool call: the arguments are JSON that matches the parameters.
called = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    temperature=0,
    max_tokens=60,
    tool_choice="required",
    tools=[{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"]}}}],
)
assert called.choices[0].finish_reason == "tool_calls", called
call = called.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and call.id.startswith("call_"), call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
ok("tool call")

# Structured output.
structured = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Name a colour."}],
    temperature=0,
    max_tokens=40,
    response_format={"type": "json_schema", "json_schema": {"name": "colour", "strict": True, "schema": {
        "type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"], "additionalProperties": False}}},
)
assert json.loads(structured.choices[0].message.content)["colour"] in ("red", "green", "blue"), structured
ok("structured output")

# Errors raise the SDK's typed errors.
expect_error(
    "n=2 is refused",
    openai.BadRequestError,
    400,
    lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2),
)
expect_error(
    "a wrong key is refused",
    openai.AuthenticationError,
    401,
    lambda: openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0)
    .chat.completions.create(model=MODEL, messages=MESSAGES),
)
if V1:
    e = expect_error(
        "an unknown model is refused",
        openai.NotFoundError,
        404,
        lambda: client.chat.completions.create(model="no-such-model", messages=MESSAGES),
    )
    assert e.code == "model_not_found", e.body
else:
    # Workers AI answers an unknown model with its 400 / 5007.
    expect_error(
        "an unknown model is refused",
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(model="no-such-model", messages=MESSAGES),
    )

if V1:
    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, logprobs=2
    )
    assert completion.object == "text_completion", completion
    c = completion.choices[0]
    assert c.text and c.finish_reason == "length", completion
    assert len(c.logprobs.tokens) == 6 and "".join(c.logprobs.tokens) == c.text, c.logprobs
    assert completion.usage.completion_tokens == 6, completion.usage
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=6, stream=True
        )
        if ch.choices
    )
    assert streamed == c.text, (streamed, c.text)
    ok("completions")
    models = [m.id for m in client.models.list()]
    assert MODEL in models, models
    ok("models.list")
else:
    # Workers AI's own OpenAI route has neither (reference section 4).
    expect_error(
        "completions are not a Workers AI route",
        openai.BadRequestError,
        400,
        lambda: client.completions.create(model=MODEL, prompt="x"),
    )
    expect_error(
        "models.list is not a Workers AI route",
        openai.BadRequestError,
        400,
        lambda: client.models.list(),
    )

print("all ok")
