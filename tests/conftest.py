"""Shared fixtures: the real default pair, loaded once per session (skipped if not installed)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)
if not torch.cuda.is_available():
    # Triton's kernels run through its interpreter on CPU (tests/test_sparse_triton.py). Set before any
    # test module imports triton: triton >= 3.9 reads it once, at its own import, and sae_lens (the
    # interop tests) imports triton long before the kernels' test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _load(fn, spec):
    from crossdiff.core.errors import CrossdiffError

    try:
        return fn(spec)
    except CrossdiffError as e:
        pytest.skip(f"default model not installed ({e}); run scripts/setup.sh")


@pytest.fixture(scope="session")
def tokenizers_ab():
    from crossdiff.inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B, load_tokenizer

    return _load(load_tokenizer, DEFAULT_MODEL_A), _load(load_tokenizer, DEFAULT_MODEL_B)


@pytest.fixture(scope="session")
def models_ab():
    from crossdiff.inputs.models import DEFAULT_MODEL_A, DEFAULT_MODEL_B, load_model

    return _load(load_model, DEFAULT_MODEL_A), _load(load_model, DEFAULT_MODEL_B)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine every OpenMP region
    waits for a descheduled thread (measured 24 ms per small embedding_bag with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
