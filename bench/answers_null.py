"""False positives of the answer-level diff (crossdiff/analysis/answers.py) on self-diffs.

Two nulls, both with no real difference between the sides:
- `--split FILE`: one model's answers split at random into two halves, paired at random; which half
  is "A" is random, so every n-gram's discordant prompts are A's with probability 1/2 (the test's
  null holds by construction). Repeated over `--repeats` random splits.
- `--pair A.jsonl B.jsonl`: two answer sets of the same model to the same prompts (e.g. sampled with
  two seeds: crossdiff generate --temperature 0.7 --seed 0 / --seed 1).

Prints, per null, the n-grams tested, the self-diffs with any significant n-gram after the correction
(the family-wise false-positive rate, which Benjamini-Hochberg bounds by q when every null is true) and
the mean number of false discoveries.

    python bench/answers_null.py --split runs/X/answers/a.jsonl --repeats 200
    python bench/answers_null.py --pair s0.jsonl s1.jsonl
"""

from __future__ import annotations

import argparse
import random
import time

from crossdiff.analysis.answers import diff_ngrams, pair_answers, read_answers


def split_pairs(answers: list[dict], rng: random.Random) -> list[tuple[dict, dict]]:
    order = answers[:]
    rng.shuffle(order)
    half = len(order) // 2
    pairs = []
    for x, y in zip(order[:half], order[half : 2 * half]):
        x, y = (dict(x, category=None), dict(y, category=None))  # a pair mixes categories
        pairs.append((x, y) if rng.random() < 0.5 else (y, x))
    return pairs


def report(name: str, runs: list[list[dict]], seconds: float) -> None:
    tested = [sum(r["scope"] == "all" for r in rows) for rows in runs]
    hits = [sum(r["scope"] == "all" and r["significant"] for r in rows) for rows in runs]
    print(
        f"{name}: {len(runs)} self-diffs, {sum(tested) / len(runs):.0f} n-grams tested each; "
        f"{sum(h > 0 for h in hits)} with a significant n-gram ({sum(h > 0 for h in hits) / len(runs):.3f}); "
        f"{sum(hits) / len(runs):.3f} false discoveries per self-diff; {seconds / len(runs):.2f} s each"
    )
    for rows in runs:
        for r in rows:
            if r["scope"] == "all" and r["significant"]:
                print(f"  {r['ngram']!r}: {r['a_only']} vs {r['b_only']}, p {r['p']:.2g}, q {r['q']:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", help="one answer file, split at random into two halves")
    ap.add_argument("--pair", nargs=2, help="two answer files of one model to the same prompts")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--q", type=float, default=0.05)
    ap.add_argument("--max-n", type=int, default=3)
    args = ap.parse_args()
    if args.split:
        answers = read_answers(args.split)
        start, runs = time.perf_counter(), []
        for seed in range(args.repeats):
            runs.append(diff_ngrams(split_pairs(answers, random.Random(seed)), args.max_n, args.q))
        report(f"split {args.split}", runs, time.perf_counter() - start)
    if args.pair:
        start = time.perf_counter()
        pairs = pair_answers(read_answers(args.pair[0]), read_answers(args.pair[1]))
        report(
            f"pair {args.pair[0]} / {args.pair[1]}",
            [diff_ngrams(pairs, args.max_n, args.q)],
            time.perf_counter() - start,
        )


if __name__ == "__main__":
    main()
