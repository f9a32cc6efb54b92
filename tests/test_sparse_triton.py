"""The CUDA path's Triton kernels (crossdiff/coder/sparse_triton.py) against dense float64 oracles.

Without a GPU they run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are defined); with one, compiled on CUDA. Triton is a dev-only dependency:
without it the module is skipped. Shapes are tiny and odd (not multiples of any block), with empty
tokens, latents repeated past one BLOCK_N tile, entries outside a model's range, bf16/fp32/fp64.

Legend: B tokens, M latents, D width, N entries.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated (module import)
pytest.importorskip("triton")

from test_sparse import CASES, _model, _run  # noqa: E402

from crossdiff.coder import sparse, sparse_triton  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative, ‖out − ref‖/‖ref‖

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(out, ref) -> float:
    assert torch.isfinite(out).all()
    return float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))


def _entries(g, n_tokens, n_cols, n, heavy_col):
    """Row-major (rows, cols) with tokens 0 and B-1 empty and one column repeated 40 times."""
    rows = torch.randint(1, n_tokens - 1, (n,), generator=g)
    cols = torch.randint(0, n_cols, (n,), generator=g)
    rows = torch.cat([rows, torch.arange(1, 41) % (n_tokens - 2) + 1])
    cols = torch.cat([cols, torch.full((40,), heavy_col)])
    key = rows * n_cols + cols
    key = key.unique()  # an entry is a (token, latent) pair: at most once, and sorted row-major
    return key // n_cols, key % n_cols


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_tokens, n_latents, width, lo", [(13, 29, 37, 0), (21, 50, 300, 7)])
def test_kernels_match_dense_oracle(dtype, n_tokens, n_latents, width, lo):
    g = torch.Generator().manual_seed(n_tokens)
    # entry columns span [0, lo + M + 5): some lie below and above the model's range [lo, lo + M)
    rows, cols = _entries(g, n_tokens, lo + n_latents + 5, 60, heavy_col=lo + 3)
    w = torch.randn(rows.numel(), generator=g).to(dtype)
    W = torch.randn(n_latents, width, generator=g).to(dtype)
    A = torch.randn(n_tokens, width, generator=g).to(dtype)
    bias = torch.randn(width, generator=g).to(dtype)
    inside = (cols >= lo) & (cols < lo + n_latents)
    S = torch.zeros(n_tokens, n_latents, dtype=torch.float64)  # the sparse matrix, dense
    S[rows[inside], cols[inside] - lo] = w[inside].double()
    Wd, Ad = W.double(), A.double()
    on = [t.to(DEV) for t in (rows, cols, w, W, A, bias)]
    r, c, wv, Wv, Av, bv = on

    x_hat = sparse_triton.bag_by_token(r, c, wv, Wv, n_tokens, bv, col_lo=lo)
    assert x_hat.dtype == dtype and _rel(x_hat, S @ Wd + bias.double()) < TOL[dtype]
    assert torch.equal(x_hat[0].cpu(), bias) and torch.equal(x_hat[-1].cpu(), bias)  # empty tokens
    g_W = sparse_triton.bag_by_latent(r, c, wv, Av, lo, lo + n_latents)
    assert g_W.shape == W.shape and _rel(g_W, S.T @ Ad) < TOL[dtype]
    dots = sparse_triton.row_dots(r, c, Av, Wv, col_lo=lo)
    ref = torch.where(inside, (Ad[rows] * Wd[(cols - lo).clamp(0, n_latents - 1)]).sum(1), 0.0)
    assert _rel(dots, ref) < TOL[dtype] and not dots.cpu()[~inside].any()
    g_J = torch.randn(n_latents, generator=g).to(dtype)
    g_J[::3] = 0
    W_poisoned = W.clone()
    W_poisoned[::3] = float("nan")  # rows without a gradient must not be read
    assert _rel(sparse_triton.rowsum_nonzero(g_J.to(DEV), W_poisoned.to(DEV)), g_J.double() @ Wd) < TOL[dtype]


def test_strided_entries():
    """Entries as strided views (what `nonzero(as_tuple=True)` returns on CUDA) give the same results."""
    g = torch.Generator().manual_seed(2)
    rows, cols = _entries(g, 11, 20, 30, heavy_col=4)
    both = torch.stack([rows, cols], 1).to(DEV)  # (N, 2): its columns are views with stride 2
    r, c = both[:, 0], both[:, 1]
    assert not r.is_contiguous()
    w = torch.randn(rows.numel(), 3, generator=g).to(DEV)[:, 1]  # strided weights too
    W, A = torch.randn(20, 9, generator=g).to(DEV), torch.randn(11, 9, generator=g).to(DEV)
    rc, cc, wc = r.contiguous(), c.contiguous(), w.contiguous()
    assert torch.equal(
        sparse_triton.bag_by_token(r, c, w, W, 11), sparse_triton.bag_by_token(rc, cc, wc, W, 11)
    )
    assert torch.equal(
        sparse_triton.bag_by_latent(r, c, w, A, 0, 20), sparse_triton.bag_by_latent(rc, cc, wc, A, 0, 20)
    )
    assert torch.equal(sparse_triton.row_dots(r, c, A, W), sparse_triton.row_dots(rc, cc, A, W))


def test_no_entries():
    empty = torch.zeros(0, dtype=torch.long, device=DEV)
    W, A = torch.randn(5, 7, device=DEV), torch.randn(3, 7, device=DEV)
    vals = torch.zeros(0, device=DEV)
    assert not sparse_triton.bag_by_token(empty, empty, vals, W, 3).any()
    assert not sparse_triton.bag_by_latent(empty, empty, vals, A, 0, 5).any()
    assert sparse_triton.row_dots(empty, empty, A, W).numel() == 0
    assert not sparse_triton.rowsum_nonzero(torch.zeros(5, device=DEV), W).any()


@pytest.fixture
def triton_path(monkeypatch):
    if not CUDA:
        monkeypatch.setattr(sparse, "TRITON_ON_CPU", True)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=lambda c: f"{c[0]}-excl{c[4]},{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_forward_and_backward_match_dense_oracle(case, dtype, triton_path, monkeypatch):
    """The whole sparse path (selection, gather_preacts, decode_pair; AuxK on) through the kernels."""
    sparsity, d_a, d_b, n_latents, ea, eb, batch, k = case
    model = _model(sparsity, d_a, d_b, n_latents, ea, eb, k, dtype=dtype).to(DEV)
    g = torch.Generator().manual_seed(5)
    x_a = torch.randn(batch, d_a, generator=g, dtype=dtype).to(DEV)
    x_b = torch.randn(batch, d_b, generator=g, dtype=dtype).to(DEV)
    dead_F = (torch.rand(n_latents, generator=g) < 0.4).to(DEV)
    (o_s, g_s), (o_d, g_d) = _run(model, x_a, x_b, dead_F, True), _run(model, x_a, x_b, dead_F, False)
    assert torch.equal(o_s.fired_F, o_d.fired_F)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o_s.loss, o_d.loss, **tol)
    assert set(g_s) == {n for n, _ in model.named_parameters()}
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], **tol, msg=name)


def test_gradcheck_through_the_autograd_functions(triton_path):
    """float64 gradchecks of decode (with a latent range) and of the encoder gather with centres."""
    g = torch.Generator().manual_seed(0)
    d_a, d_b, n_f, ea, eb, n = 4, 3, 9, 2, 3, 5

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEV).requires_grad_()

    x_a, x_b, W_a, W_b, b = rnd(n, d_a), rnd(n, d_b), rnd(n_f - eb, d_a), rnd(n_f - ea, d_b), rnd(n_f)
    c_a, c_b = rnd(d_a), rnd(d_b)
    entries = sparse.with_latent_order(
        sparse.Entries(
            torch.tensor([0, 0, 1, 2, 4, 4], device=DEV), torch.tensor([0, 5, 8, 3, 1, 6], device=DEV)
        )
    )

    def enc(x_a, x_b, W_a, W_b, b, c_a, c_b):
        xw = sparse.matmuls_nograd(x_a - c_a, x_b - c_b, W_a, W_b, n_f, ea)
        return sparse.gather_preacts(xw, entries, x_a, x_b, W_a, W_b, b, ea, c_a, c_b)

    assert torch.autograd.gradcheck(enc, (x_a, x_b, W_a, W_b, b, c_a, c_b), fast_mode=True)
    vals, W_dec_b, b_dec = rnd(6), rnd(n_f - ea, d_b), rnd(d_b)

    def dec(v, W, bb):  # model B's range starts at ea: entries with col < ea are skipped
        return sparse.sparse_decode(entries.rows_N, entries.cols_N, v, W, bb, n, entries.by_latent_N, ea)

    assert torch.autograd.gradcheck(dec, (vals, W_dec_b, b_dec), fast_mode=True)


def test_dfc_decode_pair_skips_out_of_range_entries(triton_path, monkeypatch):
    """decode_pair on the kernels (no compaction) equals the CPU path's compacted decode."""
    model = _model("batchtopk", 12, 20, 96, 7, 5, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    rows, cols = _entries(g, 16, 96, 120, heavy_col=2)
    vals = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    e = sparse.with_latent_order(sparse.Entries(rows, cols))
    e_dev = sparse.Entries(rows.to(DEV), cols.to(DEV), None, e.by_latent_N.to(DEV))
    dec = (model.W_dec_a, model.W_dec_b, model.b_dec_a, model.b_dec_b)
    got = sparse.decode_pair(e_dev, vals.to(DEV), *[t.to(DEV) for t in dec], 7, 16)
    monkeypatch.setattr(sparse, "TRITON_ON_CPU", False)
    want = sparse.decode_pair(e, vals, *dec, 7, 16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)


def test_l1_path_on_the_kernels(triton_path, monkeypatch):
    from dataclasses import replace

    from crossdiff.coder.sparsity import SPARSITIES

    monkeypatch.setitem(SPARSITIES, "l1", replace(SPARSITIES["l1"], max_sparse_density=1.0))
    sparsity, d_a, d_b, n_latents, ea, eb, batch, k = CASES[6]
    model = _model(sparsity, d_a, d_b, n_latents, ea, eb, k).to(DEV)
    x_a = torch.randn(batch, d_a, dtype=torch.float64).to(DEV)
    x_b = torch.randn(batch, d_b, dtype=torch.float64).to(DEV)
    (o_s, g_s), (o_d, g_d) = _run(model, x_a, x_b, None, True), _run(model, x_a, x_b, None, False)
    torch.testing.assert_close(o_s.loss, o_d.loss, rtol=1e-10, atol=1e-12)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-10, atol=1e-12, msg=name)


def test_kernels_compile_for_hopper_without_spills():
    """The interpreter checks what the kernels compute; this compiles them for sm_90 (no GPU needed:
    triton ships ptxas) and checks that no kernel spills registers to local memory."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "triton_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if "REG:" in x]
    assert len(lines) == 5, proc.stdout
    for line in lines:
        assert "STACK:0" in line and "LOCAL:0" in line, line
