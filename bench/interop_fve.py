"""Held-out reconstruction FVE of a run's crosscoder sides: crossdiff's side (the crosscoder read from one
model alone, crossdiff.interop.saelens.side_forward) against the same side exported with
`crossdiff export --to saelens` and loaded by SAELens itself, in raw units; and the whole crosscoder's
FVE (both models' inputs), for reference. Needs sae-lens (the dev extra).

    python bench/interop_fve.py --run RUN --store STORE [--max-rows N]

Prints one JSON object (docs/interop.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Python puts this folder first on sys.path, and bench/kernels.py would then shadow the `kernels`
# package that transformers (imported by sae_lens) loads.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import torch


def heldout_rows(store, max_rows: int) -> np.ndarray:
    rows = [store.split_rows(s, "heldout") + int(store.offsets[s]) for s in range(len(store.meta["shards"]))]
    return np.concatenate(rows)[:max_rows]


class FVE:
    """1 - Σ||x - x̂||² / Σ||x - mean||², accumulated in float64 over batches."""

    def __init__(self):
        self.sse = self.sumsq = 0.0
        self.sum = 0.0
        self.n = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.sse += float((x - x_hat).pow(2).sum())
        self.sumsq += float(x.pow(2).sum())
        self.sum = self.sum + x.sum(0)
        self.n += x.shape[0]

    def value(self) -> float:
        return 1 - self.sse / (self.sumsq - float((self.sum * self.sum).sum()) / self.n)


@torch.no_grad()
def main() -> None:
    from sae_lens import SAE

    from crossdiff.coder.crosscoder import Crosscoder
    from crossdiff.inputs.store import Store
    from crossdiff.interop.export import ExportConfig, export
    from crossdiff.interop.saelens import side_forward

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--max-rows", type=int, default=1 << 30)
    args = p.parse_args()
    cc = Crosscoder.from_pretrained(args.run).eval()
    store = Store.open(args.store)
    cc.cfg.check_store(store)
    rows = heldout_rows(store, args.max_rows)
    with tempfile.TemporaryDirectory(prefix="interop-fve-") as tmp:
        out = export(ExportConfig(run=args.run, to="saelens", out=tmp))
        saes = {side: SAE.load_from_disk(Path(out) / side) for side in "ab"}
        acc = {
            k: FVE()
            for k in (
                "crossdiff_side_a",
                "saelens_a",
                "crossdiff_side_b",
                "saelens_b",
                "crosscoder_a",
                "crosscoder_b",
            )
        }
        max_diff = {"a": 0.0, "b": 0.0}
        for i in range(0, len(rows), 1024):
            raw_a, raw_b = store.get(rows[i : i + 1024], normalised=False)
            x_hat_a, x_hat_b = cc.denormalise(*cc(*cc.normalise(raw_a, raw_b))[:2])
            acc["crosscoder_a"].update(raw_a, x_hat_a)
            acc["crosscoder_b"].update(raw_b, x_hat_b)
            for side, raw in (("a", raw_a), ("b", raw_b)):
                _, ref = side_forward(cc, side, raw)
                got = saes[side].decode(saes[side].encode(raw))
                acc[f"crossdiff_side_{side}"].update(raw, ref)
                acc[f"saelens_{side}"].update(raw, got)
                max_diff[side] = max(max_diff[side], float((got - ref).abs().max()))
    import sae_lens

    result = {k: round(v.value(), 6) for k, v in acc.items()}
    result.update(
        heldout_rows=len(rows),
        max_abs_xhat_diff_raw={k: float(f"{v:.3g}") for k, v in max_diff.items()},
        sae_lens=sae_lens.__version__,
        torch=torch.__version__,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
