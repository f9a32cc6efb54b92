"""crossdiff: cross-architecture model diffing with crosscoders.

The Python API mirrors the CLI: each stage is a config dataclass plus a function
(`harvest(HarvestConfig(...))`, `train(TrainConfig(...))`). Heavy modules load lazily so that
`import crossdiff` and `crossdiff --help` stay fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "Crosscoder": "crossdiff.coder.crosscoder",
    "CrosscoderConfig": "crossdiff.coder.crosscoder",
    "Store": "crossdiff.inputs.store",
    "HarvestConfig": "crossdiff.harvest.harvest",
    "harvest": "crossdiff.harvest.harvest",
    "TrainConfig": "crossdiff.coder.train",
    "train": "crossdiff.coder.train",
    "load_model": "crossdiff.inputs.models",
    "open_corpus": "crossdiff.inputs.corpus",
    "align": "crossdiff.inputs.align",
    "CrossdiffError": "crossdiff.core.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossdiff' has no attribute {name!r}")
