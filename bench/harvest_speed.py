"""Harvest throughput: what stopping the forward at the layer and batching by length buy.

Both paths of a comparison run the same pipeline (chunking, tokenising, aligning, masking, writing
shards) on the same text in the same process, one after the other, so their ratio holds on a busy
machine too.

    .venv/bin/python bench/harvest_speed.py --compare layer   # stopped at the layer vs every layer + LM head
    .venv/bin/python bench/harvest_speed.py --compare length --docs 8  # sorted windows vs corpus order
    .venv/bin/python bench/harvest_speed.py --padding         # tokenizers only: padding share, whole corpus

Options: --tokens 20000, --corpus brown, --device cpu, --batch-size 8. `--docs K` harvests the first K
documents whole (one block) instead of the first --tokens pairs: sorting puts a window's shortest
chunks first, so a prefix of the pairs would compare different chunks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from crossdiff.harvest.blocks import Resume, Schedule, Solo, padded_fraction
from crossdiff.harvest.harvest import HarvestConfig, _write_store
from crossdiff.inputs.corpus import open_corpus
from crossdiff.inputs.models import LanguageModel, load_model, load_tokenizer, resolve_layer


def naive_hidden(self: LanguageModel, input_ids, attention_mask, layer):
    with torch.inference_mode():
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
    return out.hidden_states[layer + 1]


def timed_harvest(cfg: HarvestConfig, lms, layers) -> float:
    start = time.perf_counter()
    _write_store(Path(cfg.out), cfg, open_corpus(cfg.corpus), lms, layers)
    return time.perf_counter() - start


def padding(args) -> None:
    """Share of the positions fed to the models that are padding, over the whole corpus."""
    toks = load_tokenizer("smollm2-135m"), load_tokenizer("gemma3-270m")
    print(f"{'batching':34s} {'padding':>8s} {'positions':>11s} {'seconds':>8s}")
    for sort_window in (1, 64):
        cfg = HarvestConfig(
            out="unused", corpus=args.corpus, batch_size=args.batch_size, sort_window=sort_window
        )
        start = time.perf_counter()
        batches = [b for _, b in Schedule(open_corpus(cfg.corpus), toks, cfg, Solo(), Resume()).batches()]
        positions = sum(
            max(len(getattr(it, k).input_ids) for it in b) * len(b)
            for b in batches
            for k in ("enc_a", "enc_b")
        )
        name = "corpus order (--sort-window 1)" if sort_window == 1 else "by length (--sort-window 64)"
        print(
            f"{name:34s} {padded_fraction(batches):8.1%} {positions:11,d} {time.perf_counter() - start:8.1f}"
        )


def compare(args) -> None:
    lms = load_model("smollm2-135m", device=args.device), load_model("gemma3-270m", device=args.device)
    layers = tuple(resolve_layer(None, lm.n_layers) for lm in lms)
    if args.compare == "layer":
        paths = [
            ("stopped at layer", LanguageModel.hidden, 64),
            ("naive (all layers + head)", naive_hidden, 64),
        ]
    else:
        hidden = LanguageModel.hidden
        paths = [
            ("sorted by length (--sort-window 64)", hidden, 64),
            ("corpus order (--sort-window 1)", hidden, 1),
        ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus, amount = args.corpus, dict(max_tokens=args.tokens)
        if args.docs:
            corpus, amount = f"jsonl:{tmp}/docs.jsonl:text", dict(max_tokens=None, docs_per_block=args.docs)
            docs = islice(open_corpus(args.corpus), args.docs)
            Path(f"{tmp}/docs.jsonl").write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
        for name, hidden, sort_window in paths:
            LanguageModel.hidden = hidden
            cfg = HarvestConfig(
                out=f"{tmp}/{len(rows)}",
                corpus=corpus,
                batch_size=args.batch_size,
                sort_window=sort_window,
                device=args.device,
                **amount,
            )
            seconds = timed_harvest(cfg, lms, layers)
            n = json.loads(Path(cfg.out, "meta.json").read_text())["n_tokens"]
            rows.append((name, n / seconds, seconds, n))
    print(f"\n{'path':36s} {'aligned tok/s':>14s} {'seconds':>8s} {'pairs':>8s}")
    for name, rate, seconds, n in rows:
        print(f"{name:36s} {rate:14.0f} {seconds:8.1f} {n:8,d}")
    print(f"device={args.device} threads={torch.get_num_threads()} tokens={args.tokens} docs={args.docs}")
    print(f"speedup={rows[0][1] / rows[1][1]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", choices=("layer", "length"), default="layer")
    p.add_argument("--padding", action="store_true", help="measure padding only (tokenizers, no models)")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--docs", type=int, default=None, help="harvest the first DOCS documents whole instead")
    p.add_argument("--corpus", default="brown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    padding(args) if args.padding else compare(args)


if __name__ == "__main__":
    main()
