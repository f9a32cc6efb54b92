"""The sparse training path against the dense oracle: selections, forward, losses and every gradient.

Legend: B tokens, F latents, D one model's width.
"""

import dataclasses

import pytest
import torch

from crossdiff.coder import sparse
from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.coder.sparsity import SPARSITIES

CASES = [
    # sparsity, d_a, d_b, n_latents, n_a_excl, n_b_excl, batch, k
    ("batchtopk", 12, 20, 64, 0, 0, 16, 4),
    ("batchtopk", 20, 12, 96, 7, 5, 24, 3),
    ("batchtopk", 9, 9, 48, 4, 4, 1, 8),
    ("topk", 12, 20, 64, 0, 0, 16, 4),
    ("topk", 16, 10, 80, 6, 9, 8, 5),
    ("l1", 12, 20, 64, 0, 0, 16, 0),
    ("l1", 10, 14, 72, 5, 3, 12, 0),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(sparsity, d_a, d_b, n_latents, ea, eb, k, seed=0, dtype=torch.float64):
    cfg = CrosscoderConfig(
        d_a=d_a,
        d_b=d_b,
        n_latents=n_latents,
        sparsity=sparsity,
        k=max(k, 1),
        n_a_exclusive=ea,
        n_b_exclusive=eb,
    )
    model = Crosscoder(cfg, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():  # move off the symmetric init so every term is exercised
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def _run(model, x_a, x_b, dead_F, sparse_kernels, guess=None, aux_per_partition=False):
    model.zero_grad(set_to_none=True)
    out = model.training_forward(
        x_a, x_b, dead_F=dead_F, aux_k=3, l1_coeff=0.3, sparse_kernels=sparse_kernels, guess=guess,
        aux_per_partition=aux_per_partition,
    )  # fmt: skip
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-F{c[3]}-excl{c[4]},{c[5]}")
@pytest.mark.parametrize("with_aux", [False, "joint", "per partition"])
def test_sparse_path_matches_dense_oracle(case, with_aux, monkeypatch):
    sparsity, d_a, d_b, n_latents, ea, eb, batch, k = case
    l1_sparse = dataclasses.replace(SPARSITIES["l1"], max_sparse_density=1.0)
    monkeypatch.setitem(SPARSITIES, "l1", l1_sparse)  # make L1 take the sparse path too
    model = _model(sparsity, d_a, d_b, n_latents, ea, eb, k)
    g = torch.Generator().manual_seed(2)
    x_a = torch.randn(batch, d_a, generator=g, dtype=torch.float64)
    x_b = torch.randn(batch, d_b, generator=g, dtype=torch.float64)
    dead_F = torch.rand(n_latents, generator=g) < 0.4 if with_aux else None
    per = with_aux == "per partition"
    (o_s, g_s), (o_d, g_d) = (_run(model, x_a, x_b, dead_F, s, aux_per_partition=per) for s in (True, False))
    for name in ("loss", "sse_a", "sse_b", "aux_loss"):
        torch.testing.assert_close(getattr(o_s, name), getattr(o_d, name), rtol=1e-12, atol=1e-12)
    assert o_s.l0 == o_d.l0 and torch.equal(o_s.fired_F, o_d.fired_F)
    if with_aux:
        assert o_s.aux_loss > 0
    assert set(g_s) == set(g_d) == {n for n, _ in model.named_parameters()}
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-10, atol=1e-12, msg=name)
        assert g_s[name].abs().sum() > 0 or name.startswith("W_enc") and not g_d[name].any(), name


def test_float32_at_moderate_size():
    model = _model("batchtopk", 48, 64, 512, 26, 26, 8, dtype=torch.float32)
    x_a, x_b = torch.randn(128, 48), torch.randn(128, 64)
    dead_F = torch.arange(512) % 3 == 0
    (o_s, g_s), (o_d, g_d) = _run(model, x_a, x_b, dead_F, True), _run(model, x_a, x_b, dead_F, False)
    torch.testing.assert_close(o_s.loss, o_d.loss, rtol=1e-5, atol=1e-5)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)


def test_selection_shortcut_is_exact():
    g = torch.Generator().manual_seed(0)
    xw_BF = torch.randn(64, 300, generator=g, dtype=torch.float64)
    bias_F = 2 * torch.randn(300, generator=g, dtype=torch.float64)
    norm_F = torch.rand(300, generator=g, dtype=torch.float64)
    norm_F[:10] = 0  # latents without a decoder are never selected
    ref = sparse.select_batch_topk(xw_BF, bias_F, norm_F, 500, shortcut=False)
    assert not (ref.cols_N < 10).any()
    # below the cutoff (accepted), above it (rejected: sample estimate), none (sample estimate), tiny
    for guess in (0.5 * float(ref.cutoff), 0.999 * float(ref.cutoff), 1.5 * float(ref.cutoff), None, 1e-9):
        got = sparse.select_batch_topk(xw_BF, bias_F, norm_F, 500, guess)
        assert torch.equal(got.rows_N, ref.rows_N) and torch.equal(got.cols_N, ref.cols_N)
        assert float(got.cutoff) == float(ref.cutoff)
    key_N = ref.rows_N * 300 + ref.cols_N
    assert torch.equal(key_N, key_N.sort().values)  # row-major order
    f32 = sparse.select_batch_topk(xw_BF.float(), bias_F.float(), norm_F.float(), 500, None)
    assert torch.equal(f32.cols_N, ref.cols_N)  # the numpy candidate pass (float32 on CPU)


def test_selection_shortcut_rejects_an_unprovable_guess(monkeypatch):
    """A guess above the true cutoff leaves too few candidates: the next route must take over."""
    calls = []
    real = sparse._try_guess
    monkeypatch.setattr(sparse, "_try_guess", lambda *a: calls.append(a[-1]) or real(*a))
    xw_BF = torch.randn(64, 200, dtype=torch.float64)
    norm_F = torch.ones(200, dtype=torch.float64)
    ref = sparse.select_batch_topk(xw_BF, None, norm_F, 300, shortcut=False)
    got = sparse.select_batch_topk(xw_BF, None, norm_F, 300, guess=10 * float(ref.cutoff))
    assert torch.equal(got.rows_N, ref.rows_N) and torch.equal(got.cols_N, ref.cols_N)
    assert len(calls) == 2 and calls[0] > float(ref.cutoff) > calls[1]


def test_selections_rank_by_decoder_norm():
    xw_BF = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, -1.0]])
    norm_F = torch.tensor([10.0, 1.0, 1.0])
    bt = sparse.select_batch_topk(xw_BF, None, norm_F, 2)
    assert list(zip(bt.rows_N.tolist(), bt.cols_N.tolist())) == [(0, 0), (1, 0)]
    assert float(bt.cutoff) == 10.0
    tk = sparse.select_topk(xw_BF, torch.tensor([0.0, 0.0, -10.0]), norm_F, 2)
    assert list(zip(tk.rows_N.tolist(), tk.cols_N.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("sddmm", [True, False])
def test_row_dots_both_kernels(sddmm):
    g = torch.Generator().manual_seed(0)
    A_BD, W_MD = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    entries = sparse.select_topk(torch.randn(7, 11, generator=g), None, torch.ones(11), 3)
    got = sparse._row_dots(entries.rows_N, entries.cols_N, A_BD, W_MD, 7, sddmm=sddmm)
    want = (A_BD[entries.rows_N] * W_MD[entries.cols_N]).sum(-1)
    torch.testing.assert_close(got, want)


def test_gradcheck_autograd_functions():
    g = torch.Generator().manual_seed(0)
    d_a, d_b, n_f, ea, eb, n = 4, 3, 9, 2, 3, 5

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    x_a, x_b, W_a, W_b, b = rnd(n, d_a), rnd(n, d_b), rnd(n_f - eb, d_a), rnd(n_f - ea, d_b), rnd(n_f)
    c_a, c_b = rnd(d_a), rnd(d_b)
    entries = sparse.Entries(torch.tensor([0, 0, 1, 2, 4, 4]), torch.tensor([0, 5, 8, 3, 1, 6]))

    def enc(x_a, x_b, W_a, W_b, b):
        xw = sparse.matmuls_nograd(x_a, x_b, W_a, W_b, n_f, ea)
        return sparse.gather_preacts(xw, entries, x_a, x_b, W_a, W_b, b, ea)

    def enc_centred(x_a, x_b, W_a, W_b, b, c_a, c_b):  # the centres' gradient is a GEMV of dL/db_enc
        xw = sparse.matmuls_nograd(x_a - c_a, x_b - c_b, W_a, W_b, n_f, ea)
        return sparse.gather_preacts(
            xw, sparse.with_latent_order(entries), x_a, x_b, W_a, W_b, b, ea, c_a, c_b
        )

    assert torch.autograd.gradcheck(enc, (x_a, x_b, W_a, W_b, b))
    assert torch.autograd.gradcheck(enc_centred, (x_a, x_b, W_a, W_b, b, c_a, c_b))
    keep = entries.cols_N < n_f - eb  # A's latents only (local index = global index for A)
    rows, cols = entries.rows_N[keep], entries.cols_N[keep]
    vals, W_dec, b_dec = rnd(len(rows)), rnd(n_f - eb, d_a), rnd(d_a)
    assert torch.autograd.gradcheck(
        lambda v, W, bb: sparse.sparse_decode(rows, cols, v, W, bb, n), (vals, W_dec, b_dec)
    )


@pytest.mark.parametrize("ea, eb", [(0, 0), (7, 5)])
def test_shared_latent_order_gives_bitwise_identical_gradients(ea, eb):
    """`with_latent_order` sorts once for the four sparseᵀ @ dense products; nothing may change."""
    model = _model("batchtopk", 12, 20, 96, ea, eb, 4, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x_a, x_b = torch.randn(16, 12, generator=g), torch.randn(16, 20, generator=g)
    xc_a, xc_b = x_a - model.b_dec_a.detach(), x_b - model.b_dec_b.detach()
    xw = sparse.matmuls_nograd(xc_a, xc_b, model.W_enc_a, model.W_enc_b, 96, ea)
    entries = sparse.select_batch_topk(xw, model.b_enc.detach(), torch.ones(96), 64)
    grads = []
    for e in (entries, sparse.with_latent_order(entries)):
        model.zero_grad(set_to_none=True)
        enc = (model.W_enc_a, model.W_enc_b, model.b_enc, ea, model.b_dec_a, model.b_dec_b)
        vals = sparse.gather_preacts(xw, e, x_a, x_b, *enc)
        dec = (model.W_dec_a, model.W_dec_b, model.b_dec_a, model.b_dec_b)
        x_hat_a, x_hat_b = sparse.decode_pair(e, vals, *dec, ea, 16)
        ((x_a - x_hat_a).pow(2).sum() + (x_b - x_hat_b).pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_empty_selection_decodes_to_bias():
    W, b = torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    vals = torch.zeros(0, requires_grad=True)
    out = sparse.sparse_decode(empty, empty, vals, W, b, 3)
    assert torch.equal(out, b.detach().expand(3, 4))
    out.sum().backward()
    assert torch.equal(W.grad, torch.zeros(6, 4)) and torch.equal(b.grad, torch.full((4,), 3.0))


@pytest.mark.parametrize("per_partition", [False, True])
@pytest.mark.parametrize("ea, eb", [(0, 0), (7, 5)])
def test_auxk_on_the_dead_subdictionary_matches_a_full_dictionary_reference(ea, eb, per_partition):
    model = _model("batchtopk", 12, 20, 96, ea, eb, 4)
    g = torch.Generator().manual_seed(3)
    x_a = torch.randn(16, 12, generator=g, dtype=torch.float64)
    x_b = torch.randn(16, 20, generator=g, dtype=torch.float64)
    err_a, err_b = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 20, dtype=torch.float64)
    dead_F = torch.rand(96, generator=g) < 0.5
    dead_F[:2] = dead_F[-2:] = True  # dead latents in every block of the partition

    def term(dead_F, models):  # AuxK does not train b_dec: its inputs are centred with a detached b_dec
        enc = (model.W_enc_a, model.W_enc_b, model.b_enc)
        pre_BF = sparse.dense_preacts(x_a - model.b_dec_a.detach(), x_b - model.b_dec_b.detach(), *enc, ea)
        masked_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        top = masked_BF.detach().topk(min(3, int(dead_F.sum())), dim=1).indices
        f_BF = pre_BF.relu() * torch.zeros_like(pre_BF, dtype=torch.bool).scatter_(1, top, True)
        e_a = f_BF[:, : model.W_dec_a.shape[0]] @ model.W_dec_a
        e_b = f_BF[:, ea:] @ model.W_dec_b
        sse = {"a": (err_a - e_a).pow(2).sum(), "b": (err_b - e_b).pow(2).sum()}
        var = {"a": (err_a - err_a.mean(0)).pow(2).sum(), "b": (err_b - err_b.mean(0)).pow(2).sum()}
        return sum(sse[m] for m in models) / sum(var[m] for m in models)

    def reference():  # per partition: each block's dead latents on the residual of the models it writes
        if not (per_partition and ea + eb):
            return term(dead_F, "ab")
        blocks = ((0, ea, "a"), (ea, 96 - eb, "ab"), (96 - eb, 96, "b"))
        in_block = [
            torch.zeros(96, dtype=torch.bool).index_fill_(0, torch.arange(lo, hi), True)
            for lo, hi, _ in blocks
        ]
        return sum(term(dead_F & mask, models) for mask, (_, _, models) in zip(in_block, blocks))

    xc_a, xc_b = x_a - model.b_dec_a, x_b - model.b_dec_b
    xw_BF = sparse.matmuls_nograd(xc_a, xc_b, model.W_enc_a, model.W_enc_b, 96, ea)
    variants = {
        "reference": reference,
        "sub-dictionary (dense path)": lambda: model._auxk(
            xc_a, xc_b, err_a, err_b, dead_F, 3, per_partition=per_partition
        ),
        "from the buffer (sparse path)": lambda: model._auxk(
            xc_a, xc_b, err_a, err_b, dead_F, 3, xw_BF, per_partition=per_partition
        ),
    }
    results = {}
    for name, fn in variants.items():
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results[name] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    l_ref, g_ref = results.pop("reference")
    assert g_ref.keys() == {"W_enc_a", "W_enc_b", "b_enc", "W_dec_a", "W_dec_b"}  # b_dec is not trained
    for variant, (l_got, g_got) in results.items():
        torch.testing.assert_close(l_got, l_ref, rtol=1e-12, atol=1e-12, msg=variant)
        assert g_got.keys() == g_ref.keys(), variant
        for name in g_ref:
            torch.testing.assert_close(
                g_got[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=f"{variant}: {name}"
            )
        # no living latent is touched
        assert (
            not g_got["b_enc"][~dead_F].any()
            and not g_got["W_dec_a"][~dead_F[: model.W_dec_a.shape[0]]].any()
        )


def test_select_topk_row_blocks_match_the_plain_per_token_topk():
    g = torch.Generator().manual_seed(5)
    n_latents, k = 1 << 15, 6  # 32 rows per block on CPU, so 70 tokens span 3 blocks (the last partial)
    xw = torch.randn(70, n_latents, generator=g)
    bias = 0.1 * torch.randn(n_latents, generator=g)
    norm = torch.rand(n_latents, generator=g)
    norm[:100] = 0  # latents without a decoder never rank
    got = sparse.select_topk(xw, bias, norm, k)
    top = ((xw + bias).clamp_min(0) * norm).topk(k, dim=1)
    rows = torch.arange(70).repeat_interleave(k)
    keep = top.values.reshape(-1) > 0
    want = sparse._row_major(rows[keep], top.indices.reshape(-1)[keep], n_latents)
    assert torch.equal(got.rows_N, want[0]) and torch.equal(got.cols_N, want[1])
    assert sparse.select_topk(xw[:0], bias, norm, k).rows_N.numel() == 0


def test_cpu_training_never_imports_triton():
    """Triton is for the CUDA path only (a CPU install may lack it): a CPU step must not import it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig\n"
        "m = Crosscoder(CrosscoderConfig(8, 12, 64, 'batchtopk', 4, n_a_exclusive=6, n_b_exclusive=6))\n"
        "out = m.training_forward(torch.randn(16, 8), torch.randn(16, 12), dead_F=torch.ones(64, dtype=torch.bool))\n"
        "out.loss.backward()\n"
        "assert m.W_dec_b.grad.abs().sum() > 0\n"
        "bad = [n for n in sys.modules if n.split('.')[0] == 'triton' or n == 'crossdiff.coder.sparse_triton']\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
