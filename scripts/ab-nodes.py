#!/usr/bin/env python3
"""Two edgerun nodes side by side, asked in alternation: an A/B of two settings (or two binaries)
in one session, as this VM's speed drifts too much for figures from separate runs.

    scripts/ab-nodes.py [--bin-a PATH] [--bin-b PATH] [--flags-a "..."] [--flags-b "..."]
                        [--rounds 4] [--prompt-tokens 1900] [--max-tokens 64]

Each round sends one streamed greedy request to A, then one to B, each with a raw prompt of its
own (so no prefix cache serves it) of about --prompt-tokens tokens, and prints per node the time
to first token and the decode rate after it, with medians. Defaults: the tree's release binary,
`--kv-storage contiguous` against `--kv-storage paged`, the default model.
"""
import argparse, http.client, json, os, shlex, statistics, subprocess, time, urllib.request

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--bin-a", default=os.path.join(root, "target/release/edgerun"))
ap.add_argument("--bin-b", default=None)
ap.add_argument("--flags-a", default="--kv-storage contiguous")
ap.add_argument("--flags-b", default="--kv-storage paged")
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--prompt-tokens", type=int, default=1900)
ap.add_argument("--max-tokens", type=int, default=64)
args = ap.parse_args()
model = os.environ.get("EDGERUN_TEST_MODEL") or subprocess.check_output(
    [os.path.join(root, "models/fetch-default.sh")]).decode().strip()

nodes = []
for name, binary, flags, port in [("A", args.bin_a, args.flags_a, 8401),
                                  ("B", args.bin_b or args.bin_a, args.flags_b, 8402)]:
    proc = subprocess.Popen(
        [binary, "serve", "--model", model, "--listen", f"127.0.0.1:{port}", "--api-token", "t",
         "--served-as", "ab"] + shlex.split(flags),
        env={**os.environ, "EDGERUN_LOG": "warn"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes.append((f"{name} ({flags})", proc, port))


def ready(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
    except Exception:
        return False


try:
    deadline = time.time() + 120
    while not all(ready(p) for _, _, p in nodes):
        assert time.time() < deadline, "the nodes did not become ready"
        time.sleep(0.3)
    words = "the harbour light turned slowly over the grey water while boats came home".split()

    def prompt(i):
        n = args.prompt_tokens * 3 // 4
        return f"Log {time.time_ns()}-{i}: " + " ".join(words[(j * 7 + i) % len(words)] for j in range(n))

    def run(port, i):
        body = json.dumps({"prompt": prompt(i), "raw": True, "max_tokens": args.max_tokens,
                           "temperature": 0, "stream": True})
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        start = time.time()
        c.request("POST", "/run/ab", body, {"authorization": "Bearer t"})
        first, n, usage = None, 0, {}
        for line in c.getresponse():
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "usage" in d:
                usage = d["usage"]
                continue
            first = first or time.time()
            n += 1
        end = time.time()
        return first - start, (n - 1) / max(end - first, 1e-9), usage.get("prompt_tokens")

    results = {name: [] for name, _, _ in nodes}
    for i in range(args.rounds):
        for name, _, port in nodes:
            results[name].append(run(port, i))
    for name, rows in results.items():
        ttft = [r[0] for r in rows]
        rate = [r[1] for r in rows]
        print(f"{name}: prompt {rows[0][2]} tokens; first token s: "
              + " ".join(f"{x:.2f}" for x in ttft) + "; decode tok/s: " + " ".join(f"{x:.1f}" for x in rate)
              + f"; medians {statistics.median(ttft):.2f} s, {statistics.median(rate):.1f} tok/s")
finally:
    for _, proc, _ in nodes:
        proc.kill()
