"""Embeds through an edgerun node with the official Python SDKs, `openai` and `cloudflare`
(installed by scripts/install-sdk-clients.sh; run by tests/tests/embeddings.rs, which starts the
node, directly or behind the Worker).

Environment: EDGERUN_NODE (the node's or the Worker's origin), EDGERUN_API_KEY, EDGERUN_MODEL
(an embedding model), EDGERUN_SDK (`openai` or `cloudflare`: which SDK this run drives; each
lives in its own virtualenv), EDGERUN_EXPECT (a JSON file: texts and their reference vectors),
EDGERUN_CHECK_LISTING (`0` where the catalogue is another node's: through the Worker, listings
go to the caller's first region, whose node may not serve the embedder).
Prints `ok <check>` per check and exits non-zero at the first failure.
"""

import json
import math
import os

NODE = os.environ["EDGERUN_NODE"]
KEY = os.environ["EDGERUN_API_KEY"]
MODEL = os.environ["EDGERUN_MODEL"]
SDK = os.environ["EDGERUN_SDK"]
with open(os.environ["EDGERUN_EXPECT"], encoding="utf-8") as f:
    EXPECT = json.load(f)
TEXTS = [e["text"] for e in EXPECT]


def ok(name):
    print(f"ok {name}", flush=True)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check(vectors, name):
    assert len(vectors) == len(EXPECT), (name, len(vectors))
    for v, e in zip(vectors, EXPECT):
        assert len(v) == len(e["embedding"]), (name, len(v))
        c = cosine(v, e["embedding"])
        assert c >= 0.9999, (name, e["text"], c)
    ok(name)


if SDK == "openai":
    import openai

    for base in (f"{NODE}/v1", f"{NODE}/client/v4/accounts/acct123/ai/v1"):
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
        # The SDK asks for base64 unless told otherwise, and decodes it.
        r = client.embeddings.create(model=MODEL, input=TEXTS)
        assert r.object == "list" and r.model == MODEL, r
        assert [d.index for d in r.data] == list(range(len(TEXTS))), r
        assert r.usage.prompt_tokens == r.usage.total_tokens > 0, r.usage
        check([d.embedding for d in r.data], f"openai embeddings.create (base64) {base}")
        r = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
        check([r.data[0].embedding] + [e["embedding"] for e in EXPECT[1:]], f"openai float {base}")
        try:
            client.embeddings.create(model=MODEL, input=TEXTS[0], dimensions=7)
            raise AssertionError("dimensions=7 accepted")
        except openai.BadRequestError:
            ok(f"openai dimensions refused {base}")
elif SDK == "cloudflare":
    import cloudflare

    client = cloudflare.Cloudflare(
        api_token=KEY, base_url=f"{NODE}/client/v4", max_retries=0, timeout=120
    )
    r = client.ai.run(MODEL, account_id="acct123", text=TEXTS)
    assert r["shape"] == [len(TEXTS), len(EXPECT[0]["embedding"])], r["shape"]
    assert r["pooling"] == "mean", r["pooling"]
    check(r["data"], "cloudflare ai.run")
    if os.environ.get("EDGERUN_CHECK_LISTING", "1") == "1":
        models = [m["name"] for m in client.ai.models.list(account_id="acct123", task="Text Embeddings")]
        assert MODEL in models, models
        ok("cloudflare models.list task=Text Embeddings")
else:
    raise SystemExit(f"unknown EDGERUN_SDK {SDK}")
print("all ok")
