"""One-shot GPU check: sparse-vs-dense correctness, then training and harvest throughput.

    PYTHONPATH=. python3 bench/gpu.py            # on a CUDA machine (< 8 min on one H100)
    PYTHONPATH=. python3 bench/gpu.py --smoke    # tiny sizes, any device (CPU check of the script)

1. Correctness on the device (fp32, TF32 off): the sparse training path against the dense oracle
   (standard BatchTopK and DFC, with AuxK active): loss, reconstruction errors and every gradient.
2. The device's bf16 matmul rate, measured now (square 8192³ matmuls).
3. Training tokens/s (the trainer's own `train_step`: forward, backward, clip, fused Adam, counters;
   bf16 autocast) at d_A = d_B = 4096, D = 65,536, k = 32, batch 4096, and at the default pair's
   widths (576/640, D = 16,384). Ceiling: the encoder forward alone, 2·(d_A+d_B)·D FLOP/token, at the
   measured matmul rate; the table prints the fraction of that ceiling reached (a sparse step also
   does selection, sparse kernels and Adam, so 100% is not reachable).
4. Harvest tokens/s of a randomly initialised model shaped like Llama-3.1-8B (hidden 4096,
   14336 intermediate, 32 heads, 8 kv heads, vocab 128256; bf16, built on the GPU, no download),
   stopped after block 16 by the harvest's own layer tap. Only blocks 0-16 are instantiated (the
   later ones never run). Ceiling: forward FLOP/token = 2·(block parameters) + 2·n_blocks·T·d
   (causal attention scores and values) at the measured matmul rate.

Exits 0 with a message (and nothing measured) on a machine without CUDA unless --smoke.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from crossdiff.crosscoder import Crosscoder, CrosscoderConfig, Partition
from crossdiff.models import LanguageModel, find_blocks
from crossdiff.train import TrainConfig, _new_state, train_step

FULL = dict(
    check=dict(d_a=256, d_b=320, latents=4096, k=16, batch=512),
    matmul=8192,
    train=[(4096, 4096, 65536, 32, 4096), (576, 640, 16384, 32, 4096)],
    train_steps=(3, 10),
    llama=dict(hidden=4096, layers=17, inter=14336, heads=32, kv=8, vocab=128256, batch=16, seq=512),
    harvest_iters=(1, 5),
)
SMOKE = dict(
    check=dict(d_a=24, d_b=40, latents=256, k=4, batch=64),
    matmul=256,
    train=[(64, 64, 1024, 8, 256), (48, 40, 512, 8, 256)],
    train_steps=(1, 3),
    llama=dict(hidden=64, layers=3, inter=128, heads=4, kv=2, vocab=1000, batch=2, seq=32),
    harvest_iters=(1, 2),
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Seconds per call (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------- 1. correctness


def check_sparse_vs_dense(device, d_a, d_b, latents, k, batch) -> list[str]:
    """Failures (empty = all agree) of the sparse path against the dense oracle, fp32."""
    failures = []
    g = torch.Generator().manual_seed(0)
    x_a = (torch.randn(batch, d_a, generator=g) + 0.3).to(device)
    x_b = (torch.randn(batch, d_b, generator=g) - 0.2).to(device)
    for frac in (0.0, 0.05):
        part = Partition.from_fractions(latents, frac)
        cfg = CrosscoderConfig(
            d_a,
            d_b,
            latents,
            "batchtopk",
            k,
            n_a_exclusive=part.n_a_exclusive,
            n_b_exclusive=part.n_b_exclusive,
        )
        model = Crosscoder(cfg, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            model.b_enc.normal_(0, 0.01)
        dead_F = torch.rand(latents, generator=g).to(device) < 0.3  # AuxK active
        results = []
        for sparse_kernels in (True, False):
            model.zero_grad(set_to_none=True)
            out = model.training_forward(
                x_a, x_b, dead_F=dead_F, aux_k=d_a // 2, sparse_kernels=sparse_kernels
            )
            out.loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            results.append((out, grads))
        (so, sg), (do, dg) = results
        name = "dfc" if frac else "standard"
        for what, a, b in [
            ("loss", so.loss, do.loss),
            ("sse_a", so.sse_a, do.sse_a),
            ("sse_b", so.sse_b, do.sse_b),
            ("aux_loss", so.aux_loss, do.aux_loss),
        ] + [(f"grad {n}", sg[n], dg[n]) for n in sg]:
            a, b = a.detach(), b.detach()
            scale = float(b.abs().max()) if b.numel() else 0.0
            err = float((a - b).abs().max()) if b.numel() else 0.0
            if not err <= 1e-4 * max(scale, 1e-6) + 1e-6:
                failures.append(f"{name}: {what} differs by {err:.3g} (scale {scale:.3g})")
        if not torch.equal(so.fired_F, do.fired_F):
            failures.append(f"{name}: the sparse and dense paths selected different latents")
    return failures


# ----------------------------------------------------------------------------- 2-4. throughput


def matmul_rate(device, n: int) -> float:
    """Measured bf16 (fp32 on CPU) matmul FLOP/s on n x n x n products."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, 3, 20)
    return 2 * n**3 / sec


def train_rate(device, d_a, d_b, latents, k, batch, arch, steps) -> float:
    frac = 0.05 if arch == "dfc" else 0.0
    part = Partition.from_fractions(latents, frac)
    ccfg = CrosscoderConfig(
        d_a, d_b, latents, "batchtopk", k, n_a_exclusive=part.n_a_exclusive, n_b_exclusive=part.n_b_exclusive
    )
    tcfg = TrainConfig(
        store="-",
        out="-",
        latents=latents,
        k=k,
        batch_size=batch,
        tokens=10**9,
        exclusive_frac=frac,
    )
    st = _new_state(Crosscoder(ccfg, device=device), device)
    g = torch.Generator(device=device).manual_seed(0)
    # a few sparse directions + noise, so the selection sees a realistic spread of values
    dirs_a = torch.randn(4 * k, d_a, device=device, generator=g)
    dirs_b = torch.randn(4 * k, d_b, device=device, generator=g)
    codes = torch.rand(batch, 4 * k, device=device, generator=g).pow(8)
    x_a = codes @ dirs_a + 0.1 * torch.randn(batch, d_a, device=device, generator=g)
    x_b = codes @ dirs_b + 0.1 * torch.randn(batch, d_b, device=device, generator=g)
    sec = timed(lambda: train_step(st, x_a, x_b, tcfg), device, *steps)
    return batch / sec


def llama_blocks_until(device, spec) -> tuple[LanguageModel, int]:
    """A random Llama built on the device in bf16 (fp32 on CPU); returns it and its block parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        intermediate_size=spec["inter"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        vocab_size=spec["vocab"],
        max_position_embeddings=max(8192, spec["seq"]),
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    blocks = find_blocks(model)
    n_block_params = sum(p.numel() for p in blocks.parameters())
    return LanguageModel("random-llama", model, None, blocks, spec["hidden"]), n_block_params


def harvest_rate(device, spec, iters) -> tuple[float, float]:
    """(tokens/s, forward FLOP per token) of the layer tap up to the last instantiated block."""
    lm, n_block_params = llama_blocks_until(device, spec)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), device=device, generator=g)
    mask = torch.ones_like(ids)
    layer = spec["layers"] - 1
    sec = timed(lambda: lm.hidden(ids, mask, layer), device, *iters)
    flop_per_token = 2 * n_block_params + 2 * spec["layers"] * spec["seq"] * spec["hidden"]
    return spec["batch"] * spec["seq"] / sec, flop_per_token


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench/gpu.py: no CUDA device here; skipping (use --smoke for a tiny CPU run)")
        return 0
    size = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}{' (smoke sizes)' if args.smoke else ''}")
    t_start = time.perf_counter()

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = check_sparse_vs_dense(device, **size["check"])
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"correctness (sparse vs dense, fp32; loss, SSE, AuxK, all grads): {'FAIL' if failures else 'ok'}")
    for f in failures:
        print("  " + f)

    rate = matmul_rate(device, size["matmul"])
    n = size["matmul"]
    print(f"matmul rate ({'bf16' if device.type == 'cuda' else 'fp32'}, {n}^3): {rate / 1e12:.3g} TFLOP/s")

    print(
        "\ntraining (train_step, bf16 autocast on CUDA; ceiling = encoder forward 2*(d_A+d_B)*D FLOP/token)"
    )
    header = f"{'arch':<10}{'d_A':>6}{'d_B':>6}{'D':>8}{'k':>4}{'batch':>7}{'tokens/s':>12}{'ceiling':>12}{'frac':>7}"
    print(header)
    for d_a, d_b, latents, k, batch in size["train"]:
        for arch in ("batchtopk", "dfc"):
            tok_s = train_rate(device, d_a, d_b, latents, k, batch, arch, size["train_steps"])
            ceiling = rate / (2 * (d_a + d_b) * latents)
            print(
                f"{arch:<10}{d_a:>6}{d_b:>6}{latents:>8}{k:>4}{batch:>7}{tok_s:>12,.0f}{ceiling:>12,.0f}{tok_s / ceiling:>7.1%}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()

    spec = size["llama"]
    tok_s, flop = harvest_rate(device, spec, size["harvest_iters"])
    ceiling = rate / flop
    print(
        f"\nharvest (random Llama-3.1-8B shape up to block {spec['layers'] - 1}, batch {spec['batch']} x "
        f"{spec['seq']}; ceiling = {flop / 1e9:.3g} GFLOP/token forward at the matmul rate)"
    )
    print(f"{'tokens/s':>12}{'ceiling':>12}{'frac':>7}")
    print(f"{tok_s:>12,.0f}{ceiling:>12,.0f}{tok_s / ceiling:>7.1%}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
