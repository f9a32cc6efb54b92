"""crossdiff: cross-architecture model diffing with crosscoders.

The Python API mirrors the CLI: each stage is a config dataclass plus a function
(`harvest(HarvestConfig(...))`, `train(TrainConfig(...))`). Heavy modules load lazily so that
`import crossdiff` and `crossdiff --help` stay fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "Crosscoder": "crossdiff.crosscoder",
    "CrosscoderConfig": "crossdiff.crosscoder",
    "Store": "crossdiff.store",
    "HarvestConfig": "crossdiff.harvest",
    "harvest": "crossdiff.harvest",
    "TrainConfig": "crossdiff.train",
    "train": "crossdiff.train",
    "load_model": "crossdiff.models",
    "open_corpus": "crossdiff.corpus",
    "align": "crossdiff.align",
    "CrossdiffError": "crossdiff.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossdiff' has no attribute {name!r}")
