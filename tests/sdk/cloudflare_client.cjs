// Drives an edgerun node with the official `cloudflare` npm package (installed by
// scripts/install-sdk-clients.sh, found through NODE_PATH; run by tests/tests/models.rs, which
// starts the node). Same environment and checks as cloudflare_client.py. Prints `ok <check>`
// per check; exits non-zero at the first failure.
'use strict';
const assert = require('node:assert/strict');
const Cloudflare = require('cloudflare');

const BASE = process.env.EDGERUN_BASE_URL;
const KEY = process.env.EDGERUN_API_KEY;
const MODEL = process.env.EDGERUN_MODEL;
const CONTEXT = process.env.EDGERUN_CONTEXT_WINDOW;
const account_id = 'acct123';
const client = new Cloudflare({ apiToken: KEY, baseURL: BASE, maxRetries: 0, timeout: 120000 });

const ok = (name) => console.log(`ok ${name}`);
const props = (m) => Object.fromEntries(m.properties.map((p) => [p.property_id, p.value]));

async function all(iterable) {
  const out = [];
  for await (const item of iterable) out.push(item);
  return out;
}

async function main() {
  const models = await all(client.ai.models.list({ account_id }));
  const names = models.map((m) => m.name);
  assert.ok(names.includes(MODEL), names.join());
  assert.equal(names.length, 2);
  const llama = models.find((m) => m.name === MODEL);
  assert.equal(llama.task.name, 'Text Generation');
  assert.equal(props(llama).context_window, CONTEXT);
  ok('models.list');

  const paged = (await all(client.ai.models.list({ account_id, per_page: 1 }))).map((m) => m.name);
  assert.deepEqual(paged, names);
  ok('models.list paginated');

  const found = (await all(client.ai.models.list({ account_id, search: 'llama-3' }))).map((m) => m.name);
  assert.deepEqual(found, [MODEL]);
  ok('models.list filtered');

  const schema = await client.ai.models.schema.get({ account_id, model: MODEL });
  assert.deepEqual(schema.input.oneOf.map((v) => v.required), [['prompt'], ['messages']]);
  assert.ok(schema.output.properties.response);
  ok('models.schema.get');

  try {
    await client.ai.models.schema.get({ account_id, model: '@cf/meta/nope' });
    throw new Error('no error for an unknown model');
  } catch (e) {
    assert.ok(e instanceof Cloudflare.BadRequestError, String(e));
    assert.equal(e.status, 400);
    assert.match(String(e.message), /No such model @cf\/meta\/nope/);
  }
  ok('models.schema.get unknown model');

  const out = await client.ai.run(MODEL, {
    account_id, prompt: 'The capital of France is', max_tokens: 8, temperature: 0,
  });
  assert.equal(typeof out.response, 'string');
  assert.ok(out.usage.completion_tokens > 0);
  ok('ai.run');

  try {
    await all(new Cloudflare({ apiToken: 'wrong', baseURL: BASE, maxRetries: 0 })
      .ai.models.list({ account_id }));
    throw new Error('no error for a wrong token');
  } catch (e) {
    assert.ok(e instanceof Cloudflare.AuthenticationError, String(e));
    assert.equal(e.status, 401);
  }
  ok('a wrong token is refused');
  console.log('all ok');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
