#!/usr/bin/env python3
"""Greedy parity with llama.cpp on one GGUF (scripts/parity-llama-cpp.sh starts the servers).

For each prompt, both servers continue greedily for STEPS tokens, each reporting its top two
log-probabilities at every step: edgerun through /v1/completions (`logprobs: 2`), llama-server
through /completion (`n_probs: 2`). Tokens are compared as text pieces (both read the file's own
vocabulary). The sequences must agree up to the end, or up to a step where llama.cpp's own top-2
margin (the difference of the two log-probabilities, which is the difference of the logits) is
under NEAR_TIE: past a near tie the two histories differ and are not compared further.

Prints one line per prompt and a summary; exits 1 if any prompt diverged at a decisive step.
"""
import json
import sys
import urllib.request

NEAR_TIE = 0.5
STEPS = 32

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "The three primary colours are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "A haiku about autumn:\n",
    "The quick brown fox",
    "To make a cup of tea, first",
    "List of prime numbers: 2, 3, 5, 7,",
    "The largest planet in our solar system is",
    "SELECT name FROM users WHERE",
]


def post(url, body, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.load(resp)


def edgerun(base, token, prompt):
    v = post(f"{base}/v1/completions", {
        "model": "parity", "prompt": prompt, "max_tokens": STEPS, "temperature": 0,
        "logprobs": 2,
    }, token)
    lp = v["choices"][0]["logprobs"]
    steps = []
    for tok, top in zip(lp["tokens"], lp["top_logprobs"]):
        best = sorted(top.values(), reverse=True)
        steps.append((tok, best[0] - best[1] if len(best) > 1 else float("inf")))
    return steps


def llama_cpp(base, prompt):
    v = post(f"{base}/completion", {
        "prompt": prompt, "n_predict": STEPS, "temperature": 0, "top_k": 1, "n_probs": 2,
        "cache_prompt": False, "samplers": ["top_k"],
    })
    steps = []
    for p in v["completion_probabilities"]:
        top = sorted((t["logprob"] for t in p["top_logprobs"]), reverse=True)
        steps.append((p["token"], top[0] - top[1] if len(top) > 1 else float("inf")))
    return steps


def main():
    edge_base, token, peer_base = sys.argv[1], sys.argv[2], sys.argv[3]
    failed = 0
    agreed_total = compared_total = 0
    for prompt in PROMPTS:
        ours, theirs = edgerun(edge_base, token, prompt), llama_cpp(peer_base, prompt)
        n = min(len(ours), len(theirs))
        verdict, agreed = "equal", n
        for i in range(n):
            if ours[i][0] != theirs[i][0]:
                agreed = i
                margin = theirs[i][1]
                if margin < NEAR_TIE:
                    verdict = f"near tie at step {i} (llama.cpp margin {margin:.3f})"
                else:
                    verdict = (f"DIVERGED at step {i}: edgerun {ours[i][0]!r}, llama.cpp "
                               f"{theirs[i][0]!r} (llama.cpp margin {margin:.3f})")
                    failed += 1
                break
        if verdict == "equal" and len(ours) != len(theirs):
            verdict = f"equal for {n} steps (lengths {len(ours)} and {len(theirs)})"
        agreed_total += agreed
        compared_total += n
        print(f"{prompt[:40]!r:44} {agreed}/{n} steps: {verdict}")
    print(f"parity: {len(PROMPTS) - failed}/{len(PROMPTS)} prompts pass; "
          f"{agreed_total}/{compared_total} steps agree before any near tie")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
