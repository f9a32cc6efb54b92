"""Harvest throughput: the forward stopped at the layer vs a naive harvest of every layer.

Both paths run the same pipeline (chunking, tokenising, aligning, masking, writing shards) on the same
text in the same process; the naive one replaces the truncated forward with a full forward that
returns all hidden states (every block and the LM head run), as a straightforward script would.

    .venv/bin/python bench/harvest_speed.py [--tokens 20000] [--corpus brown] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from crossdiff.corpus import open_corpus
from crossdiff.harvest import HarvestConfig, _write_store
from crossdiff.models import LanguageModel, load_model, resolve_layer


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--corpus", default="brown")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    lms = load_model("smollm2-135m", device=args.device), load_model("gemma3-270m", device=args.device)
    layers = tuple(resolve_layer(None, lm.n_layers) for lm in lms)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hidden in (
            ("stopped at layer", LanguageModel.hidden),
            ("naive (all layers + head)", naive_hidden),
        ):
            LanguageModel.hidden = hidden
            cfg = HarvestConfig(
                out=f"{tmp}/{len(rows)}",
                corpus=args.corpus,
                max_tokens=args.tokens,
                batch_size=args.batch_size,
                device=args.device,
            )
            seconds = timed_harvest(cfg, lms, layers)
            rows.append((name, args.tokens / seconds, seconds))
    print(f"\n{'path':28s} {'aligned tok/s':>14s} {'seconds':>8s}")
    for name, rate, seconds in rows:
        print(f"{name:28s} {rate:14.0f} {seconds:8.1f}")
    print(f"device={args.device} threads={torch.get_num_threads()} tokens={args.tokens}")
    print(f"speedup={rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
