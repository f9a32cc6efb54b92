"""Typed configs whose field docstrings are the `--help` text.

A config is a frozen dataclass; the string literal under each field documents it (as in sparsify).
`add_config_arguments` turns one into argparse options (`batch_size` -> `--batch-size`) and
`config_from_args` builds it back, so the CLI and the Python API share one definition and one
validation (`__post_init__` raising `CrossdiffError`). A config may also list `CLI_SHORTHANDS`:
options that exist only on the command line and stand for values of its fields (train's --arch).

Settings: every field changes a command's results unless its definition says otherwise, with
`where(...)` (where or how it runs: folders, device, logging; left out of the settings) or `added(...)`
(added after folders were first written: left out at its default, so those folders stay valid).
`settings(cfg)` is what a rerun compares and `fingerprint` hashes it; a folder made elsewhere, moved or
named by another spelling of its path therefore has the same settings (docs/design.md §8).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Shorthand:
    """A command-line option that stands for values of other fields (e.g. train's --arch)."""

    name: str
    help: str
    choices: tuple[str, ...]
    expand: Callable[[str, dict], dict]
    """(the option's value, the fields given explicitly) -> the fields to build the config with."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it in the class body (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    """(python type, optional?) for a field annotation such as `int | None` or `Literal['a', 'b']`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, _ = _base_type(args[0])
        return inner, True
    return tp, False


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()
) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        help_text = docs.get(f.name, "")
        if "help_from" in f.metadata:  # facts kept in a table elsewhere (the budgets), never restated
            help_text = f"{help_text} {f.metadata['help_from']()}".strip()
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        if has_default and default is not None and tp is not bool:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
        name = "--" + f.name.replace("_", "-")
        kwargs: dict = {"dest": f.name, "help": help_text}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        elif tp is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=default, help=help_text, dest=f.name
            )
            continue
        elif typing.get_origin(tp) in (tuple, list):
            kwargs["type"] = typing.get_args(tp)[0]
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = tp
        if not has_default:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
        if f.name in positional:
            kwargs.pop("dest")
            kwargs.pop("required", None)
            parser.add_argument(f.name, **kwargs)
        else:
            parser.add_argument(name, **kwargs)
    for sh in getattr(cls, "CLI_SHORTHANDS", ()):
        parser.add_argument(
            "--" + sh.name, dest="_shorthand_" + sh.name, choices=sh.choices, default=argparse.SUPPRESS,
            help=sh.help.replace("%", "%%"),
        )  # fmt: skip


def config_from_args(cls: type, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    for sh in getattr(cls, "CLI_SHORTHANDS", ()):
        if hasattr(args, "_shorthand_" + sh.name):
            values = sh.expand(getattr(args, "_shorthand_" + sh.name), values)
    return cls(**values)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- settings


def where(default=dataclasses.MISSING, **metadata):
    """A field that says where or how a command runs (a folder, the device, logging), not what it
    computes: not part of the settings, so a rerun may change it."""
    return dataclasses.field(default=default, metadata={"setting": False, **metadata})


def added(default, **metadata):
    """A result-changing field added after folders were first written: left out of the settings at its
    default, so that a folder written before the field existed keeps matching."""
    return dataclasses.field(default=default, metadata={"added": True, **metadata})


def help_from(default, table: Callable[[], str]):
    """A field whose --help ends with `table()`: text built from the definitions it describes (the
    budgets' sizes from crossdiff/budget.py), so the help cannot drift from them."""
    return dataclasses.field(default=default, metadata={"help_from": table})


def in_part(default, *parts: str):
    """A setting that a cached part of a command's work depends on (`settings(cfg, part)`)."""
    return dataclasses.field(default=default, metadata={"parts": parts})


def _defaults(cls) -> dict:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def settings_of(cls, values: dict, part: str | None = None) -> dict:
    """The settings of a config of class `cls` given as a dict (e.g. a saved one, of any crossdiff
    version): fields missing there take their defaults; keys that are not fields are dropped."""
    values = {**_defaults(cls), **values}
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("setting", True) is False or f.name not in values:
            continue
        if part is not None and part not in meta.get("parts", ()):
            continue
        v = values[f.name]
        if meta.get("added") and v == f.default:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v  # as JSON reads it back
    return out


def settings(cfg, part: str | None = None) -> dict:
    """What a config's results depend on: every field but the `where` ones (and `added` ones at their
    default); with `part`, only the fields marked as mattering to that part of the work."""
    return settings_of(type(cfg), dataclasses.asdict(cfg), part)


def fingerprint(value) -> str:
    """16 hex digits of sha256 over the value's canonical JSON: what skip-if-done records compare."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_settings(saved: dict, cfg) -> str:
    """ "name: saved -> now" for every setting in which `cfg` differs from a saved config of its class
    ("" when none), the saved values read as `settings_of` reads them."""
    cls = type(cfg)
    old, new = settings_of(cls, saved), settings(cfg)
    old_values, new_values = {**_defaults(cls), **saved}, dataclasses.asdict(cfg)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old_values.get(k)!r} -> {new_values.get(k)!r}" for k in keys)
