"""The compute budgets: each stage config gets the budget's values, and each budget's own rules hold."""

from __future__ import annotations

import pytest

from crossdiff.budget import BUDGETS, get_budget, train_config
from crossdiff.core.errors import CrossdiffError


@pytest.mark.parametrize("name", list(BUDGETS))
def test_train_config_carries_the_budget(name):
    b = get_budget(name)
    cfg = train_config(b, "store", "out", seed=2)
    got = (cfg.latents, cfg.k, cfg.tokens, cfg.batch_size, cfg.dead_tokens, cfg.lr, cfg.decay_frac, cfg.seed)
    assert got == (b.latents, b.k, b.train_tokens, b.batch_size, b.dead_tokens, b.lr, b.decay_frac, 2)
    assert cfg.arch == "dfc" and cfg.total_steps * b.batch_size >= b.train_tokens


@pytest.mark.parametrize("name", list(BUDGETS))
def test_budget_rules(name):
    """AuxK must switch on within the run (docs/diff.md: otherwise the exclusive slots die), and the
    dictionary gets at least ~500 training tokens per latent (at ~100, half the latents were dead:
    docs/diff.md, "Choosing the small budget")."""
    b = get_budget(name)
    assert b.dead_tokens <= b.train_tokens // 4
    assert b.tokens_per_latent == b.train_tokens / b.latents >= 500


def test_unknown_budget_is_a_one_line_error():
    with pytest.raises(CrossdiffError, match="unknown budget 'huge'; choose one of small, medium, large"):
        get_budget("huge")
