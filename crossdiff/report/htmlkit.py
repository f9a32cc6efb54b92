"""HTML building blocks for the static report: escaping, number formatting, tables, generic rendering.

Every piece of text that comes from data (corpus text, tokens, model ids, JSON keys) goes through `esc`
or a helper that calls it; only markup written in this package is emitted unescaped. `render_any`
turns arbitrary JSON (steering results, calibration, run metadata) into readable tables, so files whose
schema is not fixed yet still render.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape

_MAX_DEPTH = 6
_MAX_ITEMS = 500  # of one JSON list rendered generically; the rest is summarised


def esc(x) -> str:
    """Text (or anything str() accepts) as HTML, quotes escaped so it is safe in attributes too."""
    return escape(str(x), quote=True)


def is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def fmt(v) -> str:
    """A value for display (plain text, not yet escaped): 4 significant digits, — for missing/NaN."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        if abs(v) >= 1e4:  # never 1.234e+05: a reader compares magnitudes at a glance
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v)


def fmt_bytes(n) -> str:
    if not is_num(n):
        return fmt(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def num_key(v) -> str:
    """data-v attribute value that the sorting script reads (empty = missing, sorts last)."""
    if not is_num(v) or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def td(v, html: str | None = None) -> str:
    """A table cell for a value; numbers are right-aligned and carry their exact value for sorting."""
    shown = esc(fmt(v)) if html is None else html
    if is_num(v):
        return f'<td class="num" data-v="{num_key(v)}">{shown}</td>'
    return f"<td>{shown}</td>"


def badge(label) -> str:
    cls = "".join(c for c in str(label) if c.isalnum() or c == "_")
    return f'<span class="badge {cls}">{esc(label)}</span>'


def visible_ws(text: str) -> str:
    """Escaped token text with spaces, newlines and tabs made visible (token boundaries matter here)."""
    out = esc(text)
    for raw, glyph in ((" ", "·"), ("\n", "↵"), ("\t", "→"), ("\r", "␍")):
        out = out.replace(raw, f'<span class="ws">{glyph}</span>')
    return out


def kv_table(items: Iterable[tuple[str, object]], depth: int = 0) -> str:
    rows = [f"<tr><th>{esc(k)}</th><td>{render_any(v, depth + 1)}</td></tr>" for k, v in items]
    return f'<table class="kv">{"".join(rows)}</table>' if rows else '<span class="empty">empty</span>'


def data_table(
    columns: Sequence[str],
    rows: Sequence[Sequence],
    *,
    cls: str = "",
    table_id: str | None = None,
    titles: Mapping[str, str] | None = None,
    sorted_by: tuple[str, str] | None = None,
) -> str:
    """A table of cells; row entries are values, or (value, html) pairs for custom cell markup.

    Columns whose values are all numbers (or missing) get th[data-type=num] for the sorting script;
    `titles` adds a tooltip to a column's header; `sorted_by` = (column, "ascending" | "descending") marks
    the order the rows already have.
    """
    values = [[c[0] if isinstance(c, tuple) else c for c in r] for r in rows]
    numeric = [
        any(is_num(r[i]) for r in values) and all(is_num(r[i]) or _missing(r[i]) for r in values)
        for i in range(len(columns))
    ]
    titles = titles or {}
    head = "".join(
        "<th"
        + (' data-type="num"' if n else "")
        + (f' title="{esc(titles[c])}"' if c in titles else "")
        + (f' aria-sort="{esc(sorted_by[1])}"' if sorted_by and sorted_by[0] == c else "")
        + f">{esc(c)}</th>"
        for c, n in zip(columns, numeric)
    )
    body = "\n".join(
        "<tr>" + "".join(td(*c) if isinstance(c, tuple) else td(c) for c in r) + "</tr>" for r in rows
    )
    attrs = (f' id="{esc(table_id)}"' if table_id else "") + (f' class="{esc(cls)}"' if cls else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _scalar(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _columns(d: dict) -> list[str]:
    """Keys of the largest group of equal-length (>= 2) lists of scalars, if at least two share a length.

    {"strength": [-4, 0, 4], "kl": [...], "prompt": "..."} -> ["strength", "kl"]: parallel arrays read best
    as one table (a row per strength, a column per metric).
    """
    groups: dict[int, list[str]] = {}
    for k, v in d.items():
        if isinstance(v, list) and len(v) >= 2 and all(_scalar(x) for x in v):
            groups.setdefault(len(v), []).append(k)
    best = max(groups.values(), key=len, default=[])
    return best if len(best) >= 2 else []


def _text(s: str) -> str:
    if len(s) > 80 or "\n" in s:
        return f'<div class="text">{esc(s)}</div>'
    return esc(s)


def render_any(obj, depth: int = 0) -> str:
    """Any JSON value as HTML: dicts as key/value tables, lists of records as tables, text escaped."""
    if _scalar(obj):
        return _text(obj) if isinstance(obj, str) else esc(fmt(obj))
    if depth > _MAX_DEPTH:
        return f'<span class="mono">{esc(str(obj)[:500])}</span>'
    if isinstance(obj, dict):
        cols = _columns(obj)
        table = data_table([str(k) for k in cols], list(zip(*(obj[k] for k in cols)))) if cols else ""
        rest = [(str(k), v) for k, v in obj.items() if k not in cols]
        return table + (kv_table(rest, depth) if rest or not cols else "")
    items = list(obj)
    more = f'<p class="muted">… and {len(items) - _MAX_ITEMS} more</p>' if len(items) > _MAX_ITEMS else ""
    items = items[:_MAX_ITEMS]
    if not items:
        return '<span class="empty">none</span>'
    if all(_scalar(x) for x in items):
        if all(is_num(x) for x in items) or sum(len(str(x)) for x in items) < 200:
            return esc(", ".join(fmt(x) for x in items)) + more
        return "<ol>" + "".join(f"<li>{render_any(x, depth + 1)}</li>" for x in items) + "</ol>" + more
    if all(isinstance(x, dict) for x in items):
        keys = list(dict.fromkeys(k for x in items for k in x))
        rows = [[_cell(x.get(k), depth) for k in keys] for x in items]
        return f'<div class="scroll">{data_table([str(k) for k in keys], rows)}</div>' + more
    return "<ol>" + "".join(f"<li>{render_any(x, depth + 1)}</li>" for x in items) + "</ol>" + more


def _cell(v, depth: int):
    """A table cell entry for data_table: numbers stay sortable values, the rest is rendered HTML."""
    if is_num(v) or v is None:
        return v
    return (str(v), render_any(v, depth + 1))
