"""Drives an edgerun node with the official `cloudflare` Python SDK (installed by
scripts/install-sdk-clients.sh; run by tests/tests/models.rs, which starts the node).

Environment: EDGERUN_BASE_URL (the SDK's base_url: <node>/client/v4), EDGERUN_API_KEY,
EDGERUN_MODEL, EDGERUN_CONTEXT_WINDOW (what the node's /health says). Prints `ok <check>` per
check and exits non-zero at the first failure.
"""

import os

import cloudflare

BASE = os.environ["EDGERUN_BASE_URL"]
KEY = os.environ["EDGERUN_API_KEY"]
MODEL = os.environ["EDGERUN_MODEL"]
CONTEXT = os.environ["EDGERUN_CONTEXT_WINDOW"]
ACCOUNT = "acct123"

client = cloudflare.Cloudflare(api_token=KEY, base_url=BASE, max_retries=0, timeout=120)


def ok(name):
    print(f"ok {name}", flush=True)


def props(model):
    return {p["property_id"]: p["value"] for p in model["properties"]}


# client.ai.models.list(): every name the node serves, auto-paginated.
models = list(client.ai.models.list(account_id=ACCOUNT))
names = [m["name"] for m in models]
assert MODEL in names, names
assert len(names) == 2, names
llama = next(m for m in models if m["name"] == MODEL)
assert llama["task"]["name"] == "Text Generation", llama
assert props(llama)["context_window"] == CONTEXT, llama
assert len(llama["id"]) == 36, llama
ok("models.list")

# One entry per page: the SDK follows the pages until an empty one.
paged = [m["name"] for m in client.ai.models.list(account_id=ACCOUNT, per_page=1)]
assert paged == names, (paged, names)
ok("models.list paginated")

found = [m["name"] for m in client.ai.models.list(account_id=ACCOUNT, search="llama-3")]
assert found == [MODEL], found
none = list(client.ai.models.list(account_id=ACCOUNT, task="Translation"))
assert none == [], none
ok("models.list filtered")

got = client.ai.models.schema.get(account_id=ACCOUNT, model=MODEL)
assert got.input.type == "object" and got.output.type == "object", got
schema = got.to_dict()
required = [v["required"] for v in schema["input"]["oneOf"]]
assert required == [["prompt"], ["messages"]], schema["input"]
assert "response" in schema["output"]["properties"], schema["output"]
ok("models.schema.get")

try:
    client.ai.models.schema.get(account_id=ACCOUNT, model="@cf/meta/nope")
    raise AssertionError("no error for an unknown model")
except cloudflare.BadRequestError as e:
    assert e.status_code == 400
    assert "No such model @cf/meta/nope" in str(e), e
ok("models.schema.get unknown model")

# The model the list names runs (the SDK percent-encodes its slashes).
out = client.ai.run(MODEL, account_id=ACCOUNT, prompt="The capital of France is", max_tokens=8,
                    temperature=0)
assert isinstance(out["response"], str) and out["usage"]["completion_tokens"] > 0, out
ok("ai.run")

try:
    cloudflare.Cloudflare(api_token="wrong", base_url=BASE, max_retries=0).ai.models.list(
        account_id=ACCOUNT
    ).result
    raise AssertionError("no error for a wrong token")
except cloudflare.AuthenticationError as e:
    assert e.status_code == 401
ok("a wrong token is refused")

print("all ok", flush=True)
