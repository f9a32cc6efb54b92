"""`crossdiff diff` end to end on one device, with two randomly initialised models built here.

    PYTHONPATH=. python3 bench/gpu_pipeline.py            # CUDA (bench/gpu.py runs this as its last part)
    PYTHONPATH=. python3 bench/gpu_pipeline.py --smoke    # tiny models on CPU

No download and nothing carried along: the corpus is this repository's own text (docs, README and
source files, one document per paragraph), and the two tokenizers are trained on it at run time
with the `tokenizers` library (A: byte-level BPE like Llama 3's, B: a Unigram/Metaspace tokenizer
like Gemma's, different vocabularies, so the alignment stage has real work). Model A is a Llama, model
B a Gemma 3 (text), of different widths, random weights, written with save_pretrained into a temporary
folder: crossdiff loads local directories without the hub (HF_HUB_OFFLINE is set anyway).

On CUDA the diff uses the `small` budget (100k harvested pairs, D = 4096, 400k training tokens per
seed) with 2 seeds and 2 steered latents per model; --smoke uses a tiny budget (3000 pairs, D = 256,
the one tests/test_pipeline.py uses). Each stage prints its wall time and the peak device memory it
allocated (on CUDA: evidence that it ran there). The report stage writes HTML and needs no device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from crossdiff import budget  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_BUDGET = budget.Budget(
    name="bench-smoke", harvest_tokens=3000, heldout_frac=0.2, latents=256, k=8, train_tokens=6000,
    batch_size=256, dead_tokens=1500, lr=1e-3, seeds=2, steer_top=1, steer_seconds=60.0, splice_tokens=256,
)  # fmt: skip
SIZES = {  # hidden, layers, heads, kv heads, intermediate, tokenizer vocabulary
    "full": dict(a=(512, 6, 8, 4, 1536, 4000), b=(640, 6, 4, 1, 2048, 3000)),
    "smoke": dict(a=(32, 2, 2, 1, 64, 600), b=(48, 2, 2, 1, 96, 500)),
}


def corpus_text(out: Path) -> Path:
    """One .txt corpus from the repository's docs and sources (paragraphs are documents)."""
    files = sorted(REPO.glob("docs/*.md")) + [REPO / "README.md"]
    files += sorted((REPO / "crossdiff").glob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    files += sorted((REPO / "bench").glob("*.py"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
    path = out / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def train_tokenizer(texts: list[str], vocab: int, kind: str):
    """A fast tokenizer trained now: "bpe" (byte-level, no BOS) or "unigram" (Metaspace, BOS added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|begin|>", "<|end|>", "<|pad|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(texts, trainer)
        names = dict(bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>")
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=specials, unk_token="<unk>")
        tok.train_from_iterator(texts, trainer)
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
        names = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def build_models(folder: Path, corpus: Path, size: dict) -> tuple[Path, Path]:
    """Save a random Llama (A) and a random Gemma 3 (B) with their tokenizers; returns their folders."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    # The first ~200k characters suffice for these vocabularies (all of it takes minutes on 2 cores).
    texts = [p for p in corpus.read_text(encoding="utf-8")[:200_000].split("\n\n") if p.strip()]
    torch.manual_seed(0)
    out = []
    for name, kind in (("a", "bpe"), ("b", "unigram")):
        hidden, layers, heads, kv, inter, vocab = size[name]
        tok = train_tokenizer(texts, vocab, kind)
        ids = dict(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        common = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, **ids)
        heads_kw = dict(num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
        if name == "a":
            model = LlamaForCausalLM(LlamaConfig(**common, **heads_kw, tie_word_embeddings=True))
        else:
            cfg = Gemma3TextConfig(**common, **heads_kw, head_dim=hidden // heads, sliding_window=256)
            model = Gemma3ForCausalLM(cfg)
        path = folder / f"random-{type(model).__name__.removesuffix('ForCausalLM').lower()}-{hidden}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def _peak_memory_stages(stage_list, device: torch.device, peaks: dict):
    """The same stages, each wrapped to record its peak device memory (CUDA) in `peaks`."""
    from dataclasses import replace

    def wrap(stage):
        def run():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            result = stage.run()
            if device.type == "cuda":
                peaks[stage.name] = torch.cuda.max_memory_allocated(device)
            return result

        return replace(stage, run=run)

    return [wrap(s) for s in stage_list]


def run_pipeline(device: torch.device, smoke: bool, work: Path | None = None) -> dict:
    """Build the two models, run `crossdiff diff` on `device`, print and return the stage times.
    Without `work`, everything goes to a temporary folder that is removed at the end."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="crossdiff-gpu-pipeline-") as tmp:
            return run_pipeline(device, smoke, Path(tmp))
    from crossdiff import pipeline
    from crossdiff.pipeline import DiffConfig

    t0 = time.perf_counter()
    corpus = corpus_text(work)
    model_a, model_b = build_models(work, corpus, SIZES["smoke" if smoke else "full"])
    build_s = time.perf_counter() - t0
    cfg = DiffConfig(
        model_a=str(model_a),
        model_b=str(model_b),
        corpus=str(corpus),
        out=str(work / "diff"),
        budget=SMOKE_BUDGET.name if smoke else "small",
        seeds=None if smoke else 2,
        steer_top=None if smoke else 2,
        device=str(device),
    )
    budget.BUDGETS.setdefault(SMOKE_BUDGET.name, SMOKE_BUDGET)  # a name DiffConfig resolves
    peaks: dict[str, int] = {}
    real_stages = pipeline.stages
    pipeline.stages = lambda c, b: _peak_memory_stages(real_stages(c, b), device, peaks)
    try:
        summary = pipeline.diff(cfg)
    finally:
        pipeline.stages = real_stages
    print(f"\npipeline: crossdiff diff on {device}, {model_a.name} vs {model_b.name}, budget {cfg.budget}")
    print(f"  models and tokenizers built in {build_s:.1f} s ({work})")
    print(f"  {'stage':<24}{'seconds':>9}{'peak device MB':>16}")
    for name, sec in summary["stage_seconds"].items():
        peak = f"{peaks[name] / 2**20:,.0f}" if name in peaks else "-"
        print(f"  {name:<24}{sec:>9.1f}{peak:>16}")
    print(f"  total {summary['seconds_this_session']:.0f} s; report: {summary['report']}")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models (any device)")
    ap.add_argument("--out", help="working folder, kept (default: a temporary folder, removed at the end)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("bench/gpu_pipeline.py: no CUDA device here; skipping (use --smoke for a tiny CPU run)")
        return 0
    run_pipeline(device, args.smoke, Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
