// Drives an edgerun node with the official `openai` npm package (installed by
// scripts/install-sdk-clients.sh, found through NODE_PATH; run by tests/tests/openai.rs, which
// starts the node). Same environment and checks as client.py: EDGERUN_BASE_URL, EDGERUN_API_KEY,
// EDGERUN_MODEL, EDGERUN_FAMILY (`v1` or `workers-ai`). Prints `ok <check>` per check; exits
// non-zero at the first failure.
'use strict';
const assert = require('node:assert/strict');
const OpenAI = require('openai');

const BASE = process.env.EDGERUN_BASE_URL;
const KEY = process.env.EDGERUN_API_KEY;
const MODEL = process.env.EDGERUN_MODEL;
const V1 = process.env.EDGERUN_FAMILY === 'v1';
const client = new OpenAI({ baseURL: BASE, apiKey: KEY, maxRetries: 0, timeout: 120000 });
const messages = [{ role: 'user', content: 'Name three fruits.' }];

const ok = (name) => console.log(`ok ${name}`);

async function expectError(name, kind, status, call) {
  try {
    await call();
  } catch (e) {
    assert.ok(e instanceof kind, `${name}: ${e}`);
    assert.equal(e.status, status, name);
    ok(name);
    return e;
  }
  throw new Error(`${name}: no ${kind.name} thrown`);
}

async function main() {
  const chat = await client.chat.completions.create({
    model: MODEL, messages, temperature: 0, max_tokens: 24,
  });
  assert.equal(chat.object, 'chat.completion');
  const choice = chat.choices[0];
  assert.equal(choice.message.role, 'assistant');
  assert.ok(choice.message.content.length > 0);
  assert.ok(['stop', 'length'].includes(choice.finish_reason));
  const u = chat.usage;
  assert.equal(u.total_tokens, u.prompt_tokens + u.completion_tokens);
  ok('chat');

  const stream = await client.chat.completions.create({
    model: MODEL, messages, temperature: 0, max_tokens: 24, stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  const text = chunks.filter((c) => c.choices.length).map((c) => c.choices[0].delta.content ?? '').join('');
  assert.equal(text, choice.message.content);
  const last = chunks[chunks.length - 1];
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, u.completion_tokens);
  assert.ok(chunks.some((c) => c.choices.length && c.choices[0].finish_reason === choice.finish_reason));
  ok('chat stream with usage');

  // The SDK's own stream helper accumulates the chunks into a completion.
  const runner = client.chat.completions.stream({
    model: MODEL, messages, temperature: 0, max_tokens: 24,
  });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, choice.message.content);
  ok('chat stream helper');

  await expectError('n=2 is refused', OpenAI.BadRequestError, 400,
    () => client.chat.completions.create({ model: MODEL, messages, n: 2 }));
  await expectError('a wrong key is refused', OpenAI.AuthenticationError, 401,
    () => new OpenAI({ baseURL: BASE, apiKey: 'wrong', maxRetries: 0 })
      .chat.completions.create({ model: MODEL, messages }));
  // A forced tool call: the arguments are JSON that matches the parameters.
  const called = await client.chat.completions.create({
    model: MODEL, messages: [{ role: 'user', content: 'What is the weather in Paris?' }],
    temperature: 0, max_tokens: 60, tool_choice: 'required',
    tools: [{ type: 'function', function: { name: 'get_weather', description: 'Weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 30 } }, required: ['city'] } } }],
  });
  assert.equal(called.choices[0].finish_reason, 'tool_calls');
  const call = called.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  assert.equal(typeof JSON.parse(call.function.arguments).city, 'string');
  ok('tool call');
  // Structured output.
  const structured = await client.chat.completions.create({
    model: MODEL, messages: [{ role: 'user', content: 'Name a colour.' }], temperature: 0, max_tokens: 40,
    response_format: { type: 'json_schema', json_schema: { name: 'colour', strict: true,
      schema: { type: 'object', properties: { colour: { enum: ['red', 'green', 'blue'] } },
        required: ['colour'], additionalProperties: false } } },
  });
  assert.ok(['red', 'green', 'blue'].includes(JSON.parse(structured.choices[0].message.content).colour));
  ok('structured output');

  if (V1) {
    const e = await expectError('an unknown model is refused', OpenAI.NotFoundError, 404,
      () => client.chat.completions.create({ model: 'no-such-model', messages }));
    assert.equal(e.code, 'model_not_found');
    const completion = await client.completions.create({
      model: MODEL, prompt: 'The capital of France is', temperature: 0, max_tokens: 6,
    });
    assert.equal(completion.object, 'text_completion');
    assert.ok(completion.choices[0].text.length > 0);
    assert.equal(completion.choices[0].finish_reason, 'length');
    assert.equal(completion.usage.completion_tokens, 6);
    ok('completions');
    const models = [];
    for await (const m of client.models.list()) models.push(m.id);
    assert.ok(models.includes(MODEL), models.join(','));
    ok('models.list');
  } else {
    await expectError('an unknown model is refused', OpenAI.BadRequestError, 400,
      () => client.chat.completions.create({ model: 'no-such-model', messages }));
    await expectError('completions are not a Workers AI route', OpenAI.BadRequestError, 400,
      () => client.completions.create({ model: MODEL, prompt: 'x' }));
    await expectError('models.list is not a Workers AI route', OpenAI.BadRequestError, 400,
      () => client.models.list());
  }
  console.log('all ok');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
