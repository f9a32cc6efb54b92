"""One-shot GPU check: correctness, ceilings, sparse kernels, training against its floor, harvest, pipeline.

    PYTHONPATH=. python3 bench/gpu.py                 # on a CUDA machine: every part, in one call
    PYTHONPATH=. python3 bench/gpu.py --no-pipeline   # parts 1-5 only
    PYTHONPATH=. python3 bench/gpu.py --smoke         # tiny sizes on CPU (checks the script)

Runs from the source tree with the machine's own python3 (torch, transformers, triton, numpy,
safetensors, tqdm): nothing is installed or downloaded. Each part prints as it finishes.

1. Correctness on the device (fp32, TF32 off): the sparse training path (on CUDA: the Triton kernels
   of crossdiff/coder/sparse_triton.py) against the dense oracle, standard BatchTopK and DFC with AuxK
   active: loss, reconstruction errors, every gradient. Prints ok or FAIL.
2. Ceilings measured now: the bf16 matmul rate (8192³ products) and the copy bandwidth (a 2 GiB
   device-to-device copy, bytes read + written).
3. The sparse products alone at D = 65,536, d = 4096, batch 4096, k = 32: the Triton kernels against
   the CPU path's torch formulation (embedding_bag, gather-multiply, a dense GEMV) on the GPU: ms
   per call, the effective GB/s of the bytes each must move, and their agreement; then the
   segment-sum kernel's time for a few block shapes (the data for tuning its defaults), against
   torch.sparse's CSR @ dense (cuSPARSE), and with one latent active on every token (the tail).
4. Training (the trainer's own `train_step`: forward, backward, clip, fused Adam, counters; bf16
   autocast): DFC at d_A = d_B = 4096, D = 65,536, k = 32, batch 4096 and 16,384, and at the default
   pair's widths (576 + 640, D = 16,384). Per configuration: tokens/s, ms/step, and the floor
     encoder forward 2·B·(d_A+d_B)·D FLOP at the measured matmul rate
     + fp32 Adam, 28 bytes per parameter (read param, grad, m, v; write param, m, v) at the
       measured copy bandwidth,
   the fraction of that floor reached, and the torch.profiler table of the top 15 CUDA kernels
   (per step, over 3 profiled steps).
5. Harvest tokens/s of a random Llama-3.1-8B-shaped model (bf16, built on the GPU) tapped at block 16,
   against its forward FLOP at the matmul rate.
6. The whole pipeline: `crossdiff diff` on the device with a random Llama and a random Gemma 3
   (bench/gpu_pipeline.py): stage times and each stage's peak device memory.

Exits 0 with a message (and nothing measured) on a machine without CUDA unless --smoke; exits 1 if a
correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from crossdiff.coder import sparse  # noqa: E402
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig, Partition  # noqa: E402
from crossdiff.coder.train import TrainConfig, _new_state, train_step  # noqa: E402
from crossdiff.inputs.models import LanguageModel, find_blocks  # noqa: E402

FULL = dict(
    check=dict(d_a=256, d_b=320, latents=4096, k=16, batch=512),
    matmul=8192,
    copy_bytes=2 << 30,
    products=dict(d=4096, latents=65536, k=32, batch=4096),
    train=[(4096, 4096, 65536, 32, 4096), (4096, 4096, 65536, 32, 16384), (576, 640, 16384, 32, 4096)],
    train_steps=(3, 10),
    profile_steps=3,
    llama=dict(hidden=4096, layers=17, inter=14336, heads=32, kv=8, vocab=128256, batch=16, seq=512),
    harvest_iters=(1, 5),
)
SMOKE = dict(
    check=dict(d_a=24, d_b=40, latents=256, k=4, batch=64),
    matmul=256,
    copy_bytes=1 << 22,
    products=dict(d=48, latents=96, k=4, batch=24),  # through Triton's interpreter on CPU
    train=[(64, 64, 1024, 8, 256), (48, 40, 512, 8, 256)],
    train_steps=(1, 2),
    profile_steps=1,
    llama=dict(hidden=64, layers=3, inter=128, heads=4, kv=2, vocab=1000, batch=2, seq=32),
    harvest_iters=(1, 2),
)
ADAM_BYTES_PER_PARAM = 28
# (BLOCK_N, BLOCK_D, warps) of sparse_triton.segment_sum tried in part 3 (the defaults are among them)
SEGMENT_CONFIGS = [
    (32, 256, 4),
    (32, 128, 4),
    (16, 256, 4),
    (8, 512, 4),
    (4, 512, 4),
    (4, 1024, 8),
    (4, 256, 2),
]


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


# ----------------------------------------------------------------------------- 2. ceilings


def matmul_rate(device, n: int) -> float:
    """Measured bf16 (fp32 on CPU) matmul FLOP/s on n x n x n products of random data."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, 3, 20)
    return 2 * n**3 / sec


def copy_bandwidth(device, n_bytes: int) -> float:
    """Measured bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), device, 3, 20)
    return 2 * n_bytes / sec


# ----------------------------------------------------------------------------- 3. sparse products


def sparse_problem(device, d, latents, k, batch) -> dict:
    """Random row-major entries (about k per token), W (M, d), G (B, d) and the offsets both ways."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    cols = torch.randint(0, latents, (batch * k,), device=device, generator=g)
    key = (rows * latents + cols).unique()  # row-major, unique (token, latent) pairs
    rows, cols = key // latents, key % latents
    order = cols.argsort(stable=True)
    return dict(
        g=g, key=key, rows=rows, cols=cols, order=order, d=d, latents=latents, batch=batch,
        vals=torch.rand(rows.numel(), device=device, generator=g),
        W=torch.randn(latents, d, device=device, generator=g),
        G=torch.randn(batch, d, device=device, generator=g),
        tok_off=torch.searchsorted(rows, torch.arange(batch + 1, device=device)),
        lat_off=sparse._bag_offsets(cols[order], latents),
    )  # fmt: skip


def sparse_products(device, **size) -> tuple[list[tuple], list[str]]:
    """[(product, GB it must move, ms Triton, ms torch formulation, relative difference)], and the
    printable lines of `segment_sum_variants`."""
    from crossdiff.coder import sparse_triton as st

    p = sparse_problem(device, **size)
    rows, cols, vals, W, G, order, batch, M = (
        p[x] for x in ("rows", "cols", "vals", "W", "G", "order", "batch", "latents")
    )
    n, d, f4 = rows.numel(), p["d"], 4
    grad_bias = torch.zeros(M, device=device).index_add_(0, cols, vals)  # 0 off the entries
    cases = [
        ("decode (B, D) = Σ_k val·W_dec[col]", (n * d + batch * d) * f4,
         lambda: st.bag_by_token(rows, cols, vals, W, batch), lambda: sparse._bags(cols, W, p["tok_off"], vals)),
        ("∂W (M, D) = Σ_token val·G[row]", (M * d + n * d) * f4,
         lambda: st.bag_by_latent(rows, cols, vals, G, 0, M, order),
         lambda: sparse._bags(rows[order], G, p["lat_off"], vals[order])),
        ("∂vals (N,) = <G[row], W[col]>", 2 * n * d * f4,
         lambda: st.row_dots(rows, cols, G, W), lambda: sparse._row_dots(rows, cols, G, W, batch, sddmm=False)),
        ("centres (D,) = Σ_j g_j·W[j], g_j ≠ 0", int(torch.unique(cols).numel()) * d * f4,
         lambda: st.rowsum_nonzero(grad_bias, W), lambda: grad_bias @ W),
    ]  # fmt: skip
    out = []
    for name, n_bytes, new, old in cases:
        a, b = new(), old()
        rel = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
        ms_new, ms_old = timed(new, device, 2, 10) * 1e3, timed(old, device, 2, 10) * 1e3
        out.append((name, n_bytes / 1e9, ms_new, ms_old, rel))
    return out, segment_sum_variants(device, p)


def segment_sum_variants(device, p: dict) -> list[str]:
    """ms per call of: cuSPARSE's CSR @ dense (MKL on CPU), the ∂W kernel with one latent active on
    every token (one long segment: its loop runs alone), and `segment_sum` at other block shapes."""
    from crossdiff.coder import sparse_triton as st

    rows, cols, vals, W, G, order, batch, M = (
        p[x] for x in ("rows", "cols", "vals", "W", "G", "order", "batch", "latents")
    )
    lines = []
    for name, (crow, idx, w, shape, dense) in {
        "decode": (p["tok_off"], cols, vals, (batch, M), W),
        "∂W": (p["lat_off"], rows[order], vals[order], (M, batch), G),
    }.items():
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.sparse_csr_tensor(crow, idx, w, shape)
            ms = timed(lambda csr=csr, dense=dense: csr @ dense, device, 2, 10) * 1e3
        lines.append(f"  {name}: CSR @ dense (torch.sparse, cuSPARSE on CUDA) {ms:.3f} ms")
    key_h = torch.cat([p["key"], torch.arange(batch, device=device) * M]).unique()  # + latent 0 everywhere
    rows_h, cols_h = key_h // M, key_h % M
    vals_h = torch.rand(rows_h.numel(), device=device, generator=p["g"])
    ms = timed(lambda: st.bag_by_latent(rows_h, cols_h, vals_h, G, 0, M), device, 2, 10) * 1e3
    lines.append(f"  ∂W with latent 0 active on all {batch:,} tokens (Triton, default blocks): {ms:.3f} ms")
    sweep = {
        "decode": lambda c: st.segment_sum(cols, vals, p["tok_off"], W, config=c),
        "∂W": lambda c: st.segment_sum(rows[order], vals[order], p["lat_off"], G, config=c),
    }
    configs = SEGMENT_CONFIGS if device.type == "cuda" else SEGMENT_CONFIGS[:2]  # the interpreter is slow
    for name, fn in sweep.items():
        times = {c: timed(lambda c=c, fn=fn: fn(c), device, 1, 5) * 1e3 for c in configs}
        best = min(times, key=times.get)
        lines.append(f"  {name}: " + ", ".join(f"{c}: {t:.3f}" for c, t in times.items()) + f"; best {best}")
    return lines


# ----------------------------------------------------------------------------- 4. training


def train_setup(device, d_a, d_b, latents, k, batch):
    """(state, step function, parameter count) for the DFC at this size."""
    part = Partition.from_fractions(latents, 0.05)
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
        exclusive_frac=0.05,
    )
    st = _new_state(Crosscoder(ccfg, device=device), device)
    g = torch.Generator(device=device).manual_seed(0)
    # a few sparse directions + noise, so the selection sees a realistic spread of values
    dirs_a = torch.randn(4 * k, d_a, device=device, generator=g)
    dirs_b = torch.randn(4 * k, d_b, device=device, generator=g)
    codes = torch.rand(batch, 4 * k, device=device, generator=g).pow(8)
    x_a = codes @ dirs_a + 0.1 * torch.randn(batch, d_a, device=device, generator=g)
    x_b = codes @ dirs_b + 0.1 * torch.randn(batch, d_b, device=device, generator=g)
    n_params = sum(p.numel() for p in st.model.parameters())
    return st, lambda: train_step(st, x_a, x_b, tcfg), n_params


def kernel_table(prof, device, steps: int, top: int = 15) -> list[str]:
    """The top CUDA kernels (CPU ops on CPU) by self time, per step, as printable lines."""
    from torch.autograd import DeviceType

    cuda = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append((us, e.count, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    what = "CUDA kernels" if cuda else "CPU ops (no CUDA here)"
    lines = [f"    top {top} {what}, per step; all of them: {total / steps / 1e3:.2f} ms/step"]
    lines.append(f"    {'ms/step':>8}{'share':>7}{'calls':>7}  name")
    for us, count, key in rows[:top]:
        name = key if len(key) <= 90 else key[:87] + "..."
        lines.append(f"    {us / steps / 1e3:>8.3f}{us / max(total, 1):>7.1%}{count // steps:>7}  {name}")
    return lines


def profile_steps(step, device, steps: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        sync(device)
    return kernel_table(prof, device, steps)


def train_part(device, size, rate: float, bandwidth: float) -> None:
    print(
        "\n4. training (train_step, DFC, bf16 autocast on CUDA). floor = encoder forward 2*B*(d_A+d_B)*D FLOP"
        f" at {rate / 1e12:.3g} TFLOP/s + {ADAM_BYTES_PER_PARAM} B/param fp32 Adam at {bandwidth / 1e9:.4g} GB/s"
    )
    for d_a, d_b, latents, k, batch in size["train"]:
        st, step, n_params = train_setup(device, d_a, d_b, latents, k, batch)
        sec = timed(step, device, *size["train_steps"])
        floor = 2 * batch * (d_a + d_b) * latents / rate + ADAM_BYTES_PER_PARAM * n_params / bandwidth
        print(
            f"\n  DFC d_A+d_B={d_a}+{d_b} D={latents:,} k={k} batch={batch:,} ({n_params / 1e6:,.1f}M params): "
            f"{batch / sec:,.0f} tokens/s, {sec * 1e3:.1f} ms/step; floor {floor * 1e3:.1f} ms/step = "
            f"{batch / floor:,.0f} tokens/s; reached {floor / sec:.1%} of the floor"
        )
        print("\n".join(profile_steps(step, device, size["profile_steps"])))
        del st, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 5. harvest


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


# ----------------------------------------------------------------------------- main


def interpreter_kernels(smoke: bool) -> bool:
    """--smoke without CUDA: run the Triton kernels (parts 1 and 3) through Triton's interpreter, if
    triton is installed (it reads TRITON_INTERPRET when the kernels are defined, i.e. now)."""
    if not smoke or torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import crossdiff.coder.sparse_triton  # noqa: F401
    except ImportError:
        return False
    sparse.TRITON_ON_CPU = True
    return True


def correctness_part(device, size, on_triton: bool) -> list[str]:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = check_sparse_vs_dense(device, **size["check"])
    torch.backends.cuda.matmul.allow_tf32 = tf32
    path = (
        ("Triton kernels" + ("" if device.type == "cuda" else ", interpreted"))
        if on_triton
        else "CPU kernels"
    )
    print(f"1. correctness (sparse path on {path} vs dense, fp32; loss, SSE, AuxK, all grads): ", end="")
    print("FAIL" if failures else "ok")
    for f in failures:
        print("  " + f)
    return failures


def products_part(device, size) -> list[str]:
    p = size["products"]
    print(f"\n3. sparse products, D={p['latents']:,} d={p['d']} batch={p['batch']} k={p['k']} (fp32)")
    print(f"  {'product':<38}{'GB':>7}{'Triton ms':>11}{'GB/s':>8}{'torch ms':>10}{'rel diff':>10}")
    table, sweep = sparse_products(device, **p)
    failures = []
    for what, gb, ms_new, ms_old, rel in table:
        print(f"  {what:<38}{gb:>7.2f}{ms_new:>11.3f}{gb / ms_new * 1e3:>8,.0f}{ms_old:>10.3f}{rel:>10.1e}")
        failures += [f"sparse product {what}: rel diff {rel:.1e}"] if not rel < 1e-4 else []
    print(
        "  ms per call: cuSPARSE; one long segment; segment_sum per (BLOCK_N, BLOCK_D, warps)\n"
        + "\n".join(sweep)
    )
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the script)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip part 6 (crossdiff diff end to end)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("bench/gpu.py: no CUDA device here; skipping (use --smoke for a tiny CPU run)")
        return 0
    size = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_triton = device.type == "cuda" or interpreter_kernels(args.smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = f"torch {torch.__version__}" + (
        f", triton {__import__('triton').__version__}" if on_triton else ""
    )
    print(f"device: {name}, {versions}{' (smoke sizes)' if args.smoke else ''}")
    t_start = time.perf_counter()
    failures = correctness_part(device, size, on_triton)
    rate, bandwidth = matmul_rate(device, size["matmul"]), copy_bandwidth(device, size["copy_bytes"])
    kind, n = ("bf16" if device.type == "cuda" else "fp32"), size["matmul"]
    print(
        f"2. matmul rate ({kind}, {n}^3): {rate / 1e12:.3g} TFLOP/s; copy bandwidth: {bandwidth / 1e9:.4g} GB/s"
    )
    if on_triton:
        failures += products_part(device, size)
    else:
        print("\n3. sparse products: skipped (no CUDA, and no triton for its interpreter)")
    sparse.TRITON_ON_CPU = False  # training, harvest and pipeline on CPU: the CPU path
    train_part(device, size, rate, bandwidth)
    spec = size["llama"]
    tok_s, flop = harvest_rate(device, spec, size["harvest_iters"])
    ceiling = rate / flop
    print(
        f"\n5. harvest (random Llama-3.1-8B shape up to block {spec['layers'] - 1}, batch {spec['batch']} x "
        f"{spec['seq']}): {tok_s:,.0f} tokens/s; ceiling {ceiling:,.0f} ({flop / 1e9:.3g} GFLOP/token at the "
        f"matmul rate); {tok_s / ceiling:.1%}"
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"\nparts 1-5: {time.perf_counter() - t_start:.0f} s", flush=True)
    if not args.no_pipeline:
        from gpu_pipeline import run_pipeline  # bench/ is on sys.path when run as a script

        print("\n6. crossdiff diff end to end on the device (bench/gpu_pipeline.py)", flush=True)
        run_pipeline(device, args.smoke)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; correctness: {'FAIL' if failures else 'ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
