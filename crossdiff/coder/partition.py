"""Which latents a crosscoder's two models share and which each owns alone: the DFC's partition, laid
out [A-exclusive | shared | B-exclusive] (a standard crosscoder has no exclusive latents). The layout
and why its sizes are 64-aligned: crossdiff/coder/crosscoder.py's docstring, docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64
"""Exclusive partition sizes are rounded up to a multiple of this many latents (docs/training.md):
then every GEMM operand, output view and offset of the partition is 64-aligned. cuBLAS falls back
to a several-times slower kernel for unaligned column ranges (measured on an H200: the output view
out[:, 3276:65536] at 276 TFLOP/s, out[:, 3328:65536] at 719)."""
ALIGN_MIN_LATENTS = 256 * ALIGN
"""Smaller dictionaries keep the exact count: there rounding up would move the exclusive fraction
by more than 1/256 of the dictionary (5% of 4,096 = 205 would become 256, 6.25%)."""


@dataclass(frozen=True)
class Partition:
    """Which latents are A-exclusive, shared and B-exclusive, laid out [A-excl | shared | B-excl]."""

    n_latents: int
    n_a_exclusive: int = 0
    n_b_exclusive: int = 0

    @classmethod
    def from_fractions(cls, n_latents: int, frac_a: float, frac_b: float | None = None) -> Partition:
        """round(D·frac) exclusive latents per model, rounded up to a multiple of ALIGN when D is a
        multiple of ALIGN, at least ALIGN_MIN_LATENTS, and shared latents remain."""
        frac_b = frac_a if frac_b is None else frac_b
        exact = round(n_latents * frac_a), round(n_latents * frac_b)
        aligned = tuple(-(-n // ALIGN) * ALIGN for n in exact)
        if n_latents % ALIGN or n_latents < ALIGN_MIN_LATENTS or sum(aligned) >= n_latents:
            return cls(n_latents, *exact)
        return cls(n_latents, *aligned)

    @property
    def a_exclusive(self) -> range:
        return range(0, self.n_a_exclusive)

    @property
    def shared(self) -> range:
        return range(self.n_a_exclusive, self.n_latents - self.n_b_exclusive)

    @property
    def b_exclusive(self) -> range:
        return range(self.n_latents - self.n_b_exclusive, self.n_latents)

    @property
    def a_latents(self) -> range:
        """Latents that read x_A and write x̂_A (rows of W_enc_a / W_dec_a, in order)."""
        return range(0, self.n_latents - self.n_b_exclusive)

    @property
    def b_latents(self) -> range:
        return range(self.n_a_exclusive, self.n_latents)

    @property
    def is_dfc(self) -> bool:
        return self.n_a_exclusive > 0 or self.n_b_exclusive > 0

    def latents(self, m: str) -> range:
        """`a_latents` or `b_latents`: the latents with a row in model m's weights."""
        return getattr(self, f"{_model(m)}_latents")

    def blocks(self) -> tuple[tuple[str, range], ...]:
        """(name, latents) of the three parts in layout order: a_exclusive, shared, b_exclusive."""
        return (("a_exclusive", self.a_exclusive), ("shared", self.shared), ("b_exclusive", self.b_exclusive))


def _model(m: str) -> str:
    if m not in ("a", "b"):
        raise ValueError(f"a model is 'a' or 'b', got {m!r}")
    return m
