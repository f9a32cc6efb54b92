"""What the store's integrity checks cost (docs/store.md, "Integrity").

    python bench/integrity.py STORE [--repeats 5]

On the first shard of STORE: sha256 + size of its bytes (store.file_record, done once per shard at
harvest time) against writing those bytes (fsync and rename, fsutil.write_bytes_atomic); and one
epoch of Store.batches with and without the value check of every loaded shard (the NaN/inf and
|x| bound, Store._check_values). Medians of --repeats runs, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from crossdiff.core.fsutil import write_bytes_atomic
from crossdiff.inputs.store import Store, file_record


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    store = Store.open(args.store)
    data = (store.root / "shards" / f"{store.meta['shards'][0]['name']}.safetensors").read_bytes()
    checked = Store.open(args.store)
    unchecked = Store.open(args.store)
    unchecked._check_values = lambda *a: None  # the reader as it was before the check

    def epoch(s):
        for _ in s.batches(4096, epochs=1):
            pass

    times: dict[str, list[float]] = {"sha256": [], "write": [], "epoch checked": [], "epoch unchecked": []}
    with tempfile.TemporaryDirectory(dir=store.root.parent) as tmp:
        for _ in range(args.repeats):
            times["sha256"].append(_time(lambda: file_record(data)))
            times["write"].append(_time(lambda: write_bytes_atomic(Path(tmp) / "shard", data)))
            times["epoch checked"].append(_time(lambda: epoch(checked)))
            times["epoch unchecked"].append(_time(lambda: epoch(unchecked)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"shard of {len(data) / 1e6:.1f} MB: sha256 {med['sha256'] * 1e3:.0f} ms, write {med['write'] * 1e3:.0f} ms"
    )
    print(
        f"one epoch of {store.split_size('train'):,} rows: {med['epoch checked']:.2f} s with the value check, "
        f"{med['epoch unchecked']:.2f} s without"
    )


if __name__ == "__main__":
    main()
