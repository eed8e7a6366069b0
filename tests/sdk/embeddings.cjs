// Embeds through an edgerun node with the official npm SDKs, `openai` and `cloudflare` (found
// through NODE_PATH; run by tests/tests/embeddings.rs, which starts the node, directly or behind
// the Worker). Same environment and checks as embeddings.py (EDGERUN_SDK picks the SDK). Prints
// `ok <check>` per check; exits non-zero at the first failure.
'use strict';
const assert = require('node:assert/strict');
const fs = require('node:fs');

const NODE = process.env.EDGERUN_NODE;
const KEY = process.env.EDGERUN_API_KEY;
const MODEL = process.env.EDGERUN_MODEL;
const SDK = process.env.EDGERUN_SDK;
const EXPECT = JSON.parse(fs.readFileSync(process.env.EDGERUN_EXPECT, 'utf8'));
const TEXTS = EXPECT.map((e) => e.text);
const ok = (name) => console.log(`ok ${name}`);

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / (Math.sqrt(na) * Math.sqrt(nb));
}

function check(vectors, name) {
  assert.equal(vectors.length, EXPECT.length, name);
  vectors.forEach((v, i) => {
    assert.equal(v.length, EXPECT[i].embedding.length, name);
    const c = cosine(v, EXPECT[i].embedding);
    assert.ok(c >= 0.9999, `${name}: ${JSON.stringify(EXPECT[i].text)} cosine ${c}`);
  });
  ok(name);
}

async function main() {
  if (SDK === 'openai') {
    const OpenAI = require('openai');
    for (const base of [`${NODE}/v1`, `${NODE}/client/v4/accounts/acct123/ai/v1`]) {
      const client = new OpenAI({ baseURL: base, apiKey: KEY, maxRetries: 0, timeout: 120000 });
      // The SDK asks for base64 unless told otherwise, and decodes it.
      const r = await client.embeddings.create({ model: MODEL, input: TEXTS });
      assert.equal(r.object, 'list');
      assert.equal(r.model, MODEL);
      assert.ok(r.usage.prompt_tokens > 0 && r.usage.total_tokens === r.usage.prompt_tokens);
      check(r.data.map((d) => d.embedding), `openai embeddings.create ${base}`);
      const f = await client.embeddings.create({ model: MODEL, input: TEXTS, encoding_format: 'float' });
      check(f.data.map((d) => d.embedding), `openai float ${base}`);
    }
  } else if (SDK === 'cloudflare') {
    const Cloudflare = require('cloudflare');
    const client = new Cloudflare({ apiToken: KEY, baseURL: `${NODE}/client/v4`, maxRetries: 0, timeout: 120000 });
    const r = await client.ai.run(MODEL, { account_id: 'acct123', text: TEXTS });
    assert.deepEqual(r.shape, [TEXTS.length, EXPECT[0].embedding.length]);
    check(r.data, 'cloudflare ai.run');
  } else {
    throw new Error(`unknown EDGERUN_SDK ${SDK}`);
  }
  console.log('all ok');
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
