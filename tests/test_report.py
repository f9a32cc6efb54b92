"""The HTML report: fixture run data in the `crossdiff analyze` format, rendered and checked as files and in
headless Chromium (console errors, listed features, sorting, escaping of hostile corpus text).

The browser test drives Chromium over the DevTools protocol on --remote-debugging-pipe (stdlib only) and
is skipped when /usr/bin/chromium is missing (scripts/setup.sh --dev installs it when root).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from crossdiff.core.errors import CrossdiffError
from crossdiff.report.htmlkit import esc, render_any, visible_ws
from crossdiff.report.report import ReportConfig, report

NAN = float("nan")
XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
COLUMNS = (
    "latent,partition,verdict,reason,score,rel_norm,dec_norm_a,dec_norm_b,density,mean_act,max_act,p99_act,"
    "probe_r2,probe_auroc,latent_scaling"
).split(",")
EXCLUSIVE_A, EXCLUSIVE_B, SHARED_PAGE = [0, 1, 2, 3], [36, 37, 38, 39], 10


def _row(i: int) -> dict:
    part = "a_exclusive" if i in EXCLUSIVE_A else "b_exclusive" if i in EXCLUSIVE_B else "shared"
    verdict = {3: "dead"}
    rel = 0.0 if part == "a_exclusive" else 1.0 if part == "b_exclusive" else 0.3 + 0.01 * i
    return {
        "latent": i,
        "partition": part,
        "verdict": verdict.get(
            i, {"a_exclusive": "candidate_a", "b_exclusive": "candidate_b"}.get(part, "shared")
        ),
        "reason": XSS if i == 2 else "context detectable by A (AUROC 0.97)" if i == 37 else "",
        "score": NAN if i == 3 else round(5.0 - 0.1 * i, 3),
        "rel_norm": rel,
        "dec_norm_a": 1.0 - rel,
        "dec_norm_b": rel,
        "density": 0.0 if i == 3 else 10 ** (-1 - (i % 4)),
        "mean_act": 1.5,
        "max_act": 9.0 + i,
        "p99_act": 4.0,
        "probe_r2": NAN if i % 5 == 0 else 0.1 * (i % 10),
        "probe_auroc": 0.5 + 0.01 * i,
        "latent_scaling": NAN,
        "steer_verdict": "confirmed" if i == 0 else "",
    }


def _feature(i: int, row: dict) -> dict:
    tok = {"text": " dog", "highlight": True}
    examples = [
        {
            "value": 9.5 - k,
            "row": 100 + k,
            "doc": 7,
            "source": "brown:ca01",
            "text_before": f"The {XSS} big\nbrown",
            "text_token": XSS if k == 0 else " dog",
            "text_after": " barked at the <b>mailman</b>.",
            "tokens_a": [{"text": "The", "highlight": False}, {"text": XSS, "highlight": False}, tok],
            "tokens_b": [{"text": "▁The", "highlight": False}, {"text": "▁big\n", "highlight": False}, tok],
        }
        for k in range(3)
    ]
    return {
        "latent": i,
        "partition": row["partition"],
        "verdict": row["verdict"],
        "stats": row,
        "examples": examples,
        # As crossdiff.analysis.evidence.Histogram writes it: shared log-spaced edges 1e-3..1e3, most bins empty.
        "histogram": {
            "edges": [10 ** (-3 + k / 4) for k in range(25)],
            "counts": [0] * 12 + [50, 20, 5, 1] + [0] * 8,
        },
        "logit_lens": {"model": "a", "promoted": [[" dog", 3.2], [XSS, 2.0]], "suppressed": [[" cat", -2.5]]},
    }


def make_run(root: Path, n_latents: int = 40, features: bool = True) -> Path:
    """A run folder exactly as `crossdiff train` + `crossdiff analyze` leave it."""
    run = root / "run"
    (run / "analysis" / "features").mkdir(parents=True)
    cfg = {"format_version": 1, "architecture": "dfc", "d_a": 64, "d_b": 80, "n_latents": n_latents,
           "sparsity": "batchtopk", "k": 4, "n_a_exclusive": 4, "n_b_exclusive": 4, "scale_a": 0.5,
           "scale_b": 2.0, "model_a": "org/model-a" + XSS, "model_b": "org/model-b", "layer_a": 3,
           "layer_b": 5}  # fmt: skip
    (run / "cfg.json").write_text(json.dumps(cfg))
    evals = {"fve_a": 0.83, "fve_b": 0.79, "l0": 4.2, "dead_fraction": 0.05, "tokens_trained": 1_000_000}
    (run / "eval.json").write_text(json.dumps(evals))
    rows = [_row(i) for i in range(n_latents)]
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "steer_verdict"])
        w.writeheader()
        w.writerows(rows)
    summary = {
        "n_latents": n_latents,
        "counts": {"candidate_a": 3, "candidate_b": 4, "shared": 32, "dead": 1},
        "candidates": {"a": 3, "b": 4},
        **{k: evals[k] for k in ("fve_a", "fve_b", "l0", "dead_fraction")},
        "n_tokens_analysed": 200_000,
        "thresholds": {"probe_r2": 0.5, "probe_auroc": 0.9},
        "splice": {
            m: {"clean": 3.1, "splice": 3.4, "zero": 7.9, "loss_recovered": 0.94, "n_tokens": 4096}
            for m in ("a", "b")
        },  # fmt: skip
        "run": {"seed": 0, "note": XSS},
        "store": {"path": "/data/store", "n_tokens": 2_000_000, "size_bytes": 123_456_789},
    }
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    for i in [*EXCLUSIVE_A, *EXCLUSIVE_B, SHARED_PAGE] if features else []:
        (run / "analysis" / "features" / f"{i}.json").write_text(json.dumps(_feature(i, rows[i])))
    (run / "steering").mkdir()
    steer = {"latent": 0, "strengths": [-4, 0, 4, 8], "kl": [0.3, 0.0, 0.4, 1.2], "delta_logprob": [-1, 0, 1, 2],
             "generations": [{"prompt": "Once", "baseline": "upon a time", "steered": "a dog " + XSS}]}  # fmt: skip
    (run / "steering" / "0.json").write_text(json.dumps(steer))
    (run / "calibration.json").write_text(
        json.dumps({"self_diff": {"verified": 0}, "planted": {"recall": 1.0}})
    )
    write_verification(run)
    return run


BEHAVIOUR = {0: ("a", "difference", 0.21, 6.5, 0.42), 1: ("a", "inert", 0.001, 0.4, 0.0),
             2: ("a", "too rare", NAN, NAN, NAN), 36: ("b", "difference", 0.08, 3.4, 0.11),
             37: ("b", "shared behaviour", -0.2, -5.0, -0.3), 38: ("b", "not verified", NAN, NAN, NAN),
             39: ("b", "too rare", NAN, NAN, NAN)}  # fmt: skip


def write_verification(run: Path) -> None:
    """RUN/verification/ as `crossdiff verify` leaves it (docs/verification.md), trimmed."""
    from crossdiff.analysis.verify import COLUMNS as VCOLS

    out = run / "verification"
    (out / "latents").mkdir(parents=True)
    with open(out / "behaviour.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=VCOLS)
        w.writeheader()
        for j, (side, verdict, shift, z, closed) in BEHAVIOUR.items():
            w.writerow({"latent": j, "side": side, "verdict": verdict, "shift": shift, "z": z, "gap_closed": closed,
                        "n_strong": 12, "n_contexts": 8})  # fmt: skip
    ctx = {"text_before": "the old " + XSS, "scored": " dog barked", "f": 3.0, "n_tokens": 3, "l_own": -9.0,
           "l_other": -6.0, "l_ablated": -7.0, "shift": 0.66, "random_shifts": [0.0] * 8, "first_order": 0.5}  # fmt: skip
    (out / "latents" / "0.json").write_text(json.dumps({"latent": 0, "contexts": [ctx]}))
    whole = {m: {"share": 0.12, "gap_spliced": 10.0, "gap_without_candidates": 8.8} for m in "ab"}
    counts = {m: {} for m in "ab"}
    for side, verdict, *_ in BEHAVIOUR.values():
        counts[side][verdict] = counts[side].get(verdict, 0) + 1
    (out / "summary.json").write_text(
        json.dumps({"candidates": {"a": 3, "b": 4}, "counts": counts, "whole": whole})
    )


def _all_html(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in (run / "report").rglob("*.html")}


# ----------------------------------------------------------------------------- unit tests


def test_fixture_cfg_matches_crosscoder_config(tmp_path):
    """The fixture's cfg.json is one that crossdiff.coder.crosscoder would write and read back."""
    from crossdiff.coder.crosscoder import CrosscoderConfig

    cfg = json.loads((make_run(tmp_path) / "cfg.json").read_text())
    assert CrosscoderConfig.from_dict(cfg).to_dict().keys() >= cfg.keys()


def test_escaping_helpers():
    assert esc(XSS).count("<") == 0 and "&lt;script&gt;" in esc(XSS) and "&quot;" in esc('"')
    assert visible_ws(" a<b>\n") == '<span class="ws">·</span>a&lt;b&gt;<span class="ws">↵</span>'
    html = render_any({XSS: [XSS, {"k": XSS}], "rows": [{XSS: 1.0}, {XSS: NAN}], "n": [1, 2, 3]})
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    steer = render_any({"latent": 3, "alpha": [-2, 0, 2], "kl": [0.5, 0.0, 0.7], "note": "x"})
    assert steer.startswith('<table><thead><tr><th data-type="num">alpha</th><th data-type="num">kl</th>')
    assert steer.count("<tr>") == 1 + 3 + 2 and "<th>latent</th>" in steer and "<th>note</th>" in steer


def test_missing_analysis_is_one_line_error(tmp_path, capsys):
    from crossdiff.cli import main

    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(CrossdiffError, match="run crossdiff analyze first"):
        report(ReportConfig(run=str(tmp_path)))
    assert main(["report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "run crossdiff analyze first" in err and "\n" not in err


def test_report_files_and_escaping(tmp_path):
    run = make_run(tmp_path)
    index = report(ReportConfig(run=str(run)))
    assert index == run / "report" / "index.html"
    pages = _all_html(run)
    expected = {f"report/features/{i}.html" for i in [*EXCLUSIVE_A, *EXCLUSIVE_B, SHARED_PAGE]}
    assert set(pages) == {"report/index.html", *expected}
    assert (run / "report" / "assets" / "report.js").is_file()
    for name, html in pages.items():
        assert html.count("<script") == 1, name  # only our own script tag
        assert "<img" not in html and 'onerror="' not in html, name
        assert not any(s in html for s in ('src="http', 'href="http', "//cdn", "@import")), name
    idx = pages["report/index.html"]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in idx  # the hostile model id, shown as text
    assert "steer_verdict" in idx and "confirmed" in idx  # extra columns are shown
    # The report leads with the behavioural differences, most of the gap closed first.
    diffs = idx[
        idx.index("<h2>Behavioural differences</h2>") : idx.index("<h2>Where every candidate lies</h2>")
    ]
    assert diffs.index('href="features/0.html"') < diffs.index('href="features/36.html"')
    # the label (analysis/labels.py): 3 examples, 2 distinct contexts (the last two are identical)
    assert "“ dog” 1/2 · after “brown” · → “barked”" in diffs
    assert "12.0% of the per-segment gap" in idx  # the whole-diff share, in the headline
    assert "shared behaviour" in idx and "not verified" in idx  # joined into the candidates table
    assert "Calibration" in idx and "self_diff" in idx and "117.7 MB" in idx
    assert 'href="features/10.html"' in idx  # the shared latent with a page is linked too
    f0, f1 = pages["report/features/0.html"], pages["report/features/1.html"]
    assert "<mark>&lt;script&gt;" in f0 and "Steering" in f0 and "delta_logprob" in f0
    assert "What removing it does" in f0 and "ℓ A, latent removed" in f0 and "difference" in f0
    assert "Steering" not in f1 and "Logit lens" in f1 and "log10(activation)" in f1


def test_histogram_view_trims_and_uses_log_axis():
    from crossdiff.report.report import _hist_view

    edges, counts, label = _hist_view([10.0 ** (k - 3) for k in range(7)], [0, 0, 3, 4, 0, 0])
    assert (edges, counts, label) == ([-2.0, -1.0, 0.0, 1.0, 2.0], [0, 3, 4, 0], "log10(activation)")
    assert _hist_view([0, 1, 2, 4], [1, 2, 3]) == ([0, 1, 2, 4], [1, 2, 3], "activation")


def test_rerender_replaces_report_and_leaves_no_temp(tmp_path):
    run = make_run(tmp_path)
    report(ReportConfig(run=str(run)))
    (run / "report" / "stale.html").write_text("old")
    (run / "analysis" / "features" / "39.json").unlink()
    report(ReportConfig(run=str(run), max_examples=1))
    assert not (run / "report" / "stale.html").exists()
    assert not (run / "report" / "features" / "39.html").exists()
    assert "Top examples (1 of 3," in (run / "report" / "features" / "0.html").read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def _calibration() -> dict:
    """calibration.json as `crossdiff calibrate` writes it (docs/calibration.md), trimmed."""

    def arch(recovered: bool, cosine: float, verified: bool, false_self: int) -> dict:
        match = {"latent": 7, "cosine": 0.97, "top_on_words": 1.0, "partition": "a_exclusive",
                 "analysis_verdict": "candidate_a", "verdict": "inert " + XSS, "shift": 0.001, "z": 0.4,
                 "probe_auroc": 0.99, "density": 0.008, "rel_norm": 0.0}  # fmt: skip
        positive = {"recovered": recovered, "cosine": cosine, "verified": verified,
                    "best_candidate": match, "best_overall": match}  # fmt: skip
        negative = {"self_false_exclusive": false_self, "rotated_false_exclusive": 0, "self_candidates": 12}
        return {"positive": positive, "positive_random": positive, "negative": negative}

    by_arch = {"dfc": arch(True, 0.95, False, 0), "batchtopk": arch(True, 0.93, True, 3)}
    return {"positive": by_arch["dfc"]["positive"], "negative": by_arch["dfc"]["negative"], "by_arch": by_arch,
            "words": ["house", XSS], "n_planted_rows": 812, "n_planted_heldout_rows": 77, "planted_norm": 170.3,
            "criteria": {"cosine_min": 0.9, "top_on_words_min": 0.5}}  # fmt: skip


def test_calibration_section_from_the_diff_folder(tmp_path):
    """calibrate writes DIR/calibration.json next to DIR/run: the report finds it there and tabulates it."""
    run = make_run(tmp_path)
    (run / "calibration.json").unlink()
    (tmp_path / "calibration.json").write_text(json.dumps(_calibration()))
    html = report(ReportConfig(run=str(run))).read_text()
    section = html[html.index("<h2>Calibration</h2>") : html.index("<h2>Run details</h2>")]
    assert "812" in section and "77" in section and "170.3" in section
    rows = section.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert len(rows) == 2 and "DFC" in rows[0] and "fail" in rows[0] and "pass" in rows[1]
    assert ">3</td>" in rows[1]  # the standard crosscoder's self-diff false differences
    assert "Latents closest to the planted directions" in section and "inert" in section
    assert "<script" not in section and "&lt;script&gt;" in section
    (tmp_path / "calibration.json").write_text(json.dumps({"planted": {"recall": 1.0}}))  # another shape
    html = report(ReportConfig(run=str(run))).read_text()
    assert "Calibration" in html and "recall" in html and "Latents closest" not in html


def test_minimal_analysis_renders(tmp_path):
    run = make_run(tmp_path, features=False)
    for p in ("cfg.json", "eval.json", "calibration.json", "analysis/summary.json"):
        (run / p).unlink()
    shutil.rmtree(run / "steering")
    html = report(ReportConfig(run=str(run))).read_text()
    # 8 latents in the exclusive partitions, less latent 3 that never fired (dead is no candidate).
    assert "Candidates (7)" in html and "No splice-in evaluation" in html


def test_large_run_index_stays_small(tmp_path):
    run = make_run(tmp_path, n_latents=5000, features=False)
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for i in range(5000):
            w.writerow({**_row(i % 40), "latent": i, "partition": "a_exclusive"})
    html = report(ReportConfig(run=str(run))).read_text()
    assert "Candidates (4875)" in html and len(html) < 4_000_000  # less 125 dead (i % 40 == 3)


def test_candidates_are_the_analysis_candidates_including_norm_rule_ones(tmp_path):
    """A shared-partition latent with relative norm <= 0.1 is an A candidate (docs/design.md §5), and the
    report lists it among the candidates, with its side (from a latents.csv without the side column)."""
    run = make_run(tmp_path, features=False)
    rows = [_row(i) for i in range(40)]
    reason = "context detectable by B (AUROC 0.93, magnitude R² 0.20 on strong firings)"
    rows[20].update(rel_norm=0.05, dec_norm_a=0.95, dec_norm_b=0.05, verdict="candidate_a", reason=reason)
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    html = report(ReportConfig(run=str(run))).read_text()
    assert "Candidates (8)" in html and "partly detectable by B (AUROC 0.70)" in html


def test_steering_verdicts_come_from_the_steering_file(tmp_path):
    """crossdiff steer writes RUN/steering/verdicts.csv; the report joins it by latent id, and a rerun of
    the analysis (latents.csv rewritten without steering columns) does not lose it."""
    run = make_run(tmp_path, features=False)
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(_row(i) for i in range(40))
    (run / "steering" / "verdicts.csv").write_text("latent,verdict,effect\n36,pass,7.25\n")
    idx = report(ReportConfig(run=str(run))).read_text()
    assert "steer_verdict" in idx and "7.25" in idx and ">pass<" in idx


# ----------------------------------------------------------------------------- the browser


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


class Browser:
    """Minimal Chrome DevTools Protocol client: NUL-separated JSON over fds 3 (in) and 4 (out)."""

    def __init__(self, user_dir: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def fds():  # in the child: the pipe ends become fds 3 and 4, whatever numbers they had
            hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]
            os.dup2(hi[0], 3)
            os.dup2(hi[1], 4)

        args = [CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "about:blank"]
        # close_fds=False: our pipes are close-on-exec anyway; only the dup2'ed fds 3 and 4 are inherited.
        self.proc = subprocess.Popen(
            args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(cmd_r)
        os.close(out_w)
        self.events: list[dict] = []
        self._msgs: queue.Queue = queue.Queue()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)

    def _read(self):
        buf = b""
        while chunk := os.read(self._out_r, 1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for m in msgs:
                self._msgs.put(json.loads(m))

    def wait(self, pred, timeout: float = 20.0) -> dict:
        """Queue messages as events until one satisfies pred; return it."""
        while True:
            msg = self._msgs.get(timeout=timeout)
            if pred(msg):
                return msg
            if "method" in msg:
                self.events.append(msg)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == msg["id"])
        assert "error" not in reply, reply
        return reply["result"]

    def goto(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired")

    def js(self, expr: str):
        res = self.call("Runtime.evaluate", session=True, expression=expr, returnByValue=True)
        assert "exceptionDetails" not in res, res
        return res["result"].get("value")

    def errors(self) -> list[dict]:
        bad = {"Runtime.exceptionThrown"}
        return [
            e for e in self.events
            if e["method"] in bad
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]  # fmt: skip

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self._cmd_w)


COL = "Array.from(document.querySelectorAll('#candidates tbody tr')).map(r => r.cells[{}].textContent)"


@pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="chromium not installed (scripts/setup.sh --dev)"
)
def test_report_in_headless_chromium(tmp_path):
    run = make_run(tmp_path)
    # Latent 3 fired but has no score (a missing value): a candidate, listed, sorted last.
    rows = [{**_row(i), **({"verdict": "candidate_a", "density": 1e-3} if i == 3 else {})} for i in range(40)]
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "steer_verdict"])
        w.writeheader()
        w.writerows(rows)
    (run / "calibration.json").unlink()
    (tmp_path / "calibration.json").write_text(json.dumps(_calibration()))
    index = report(ReportConfig(run=str(run)))
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(index.as_uri())
        heads = browser.js("Array.from(document.querySelectorAll('#candidates th')).map(h => h.textContent)")
        latent, score = heads.index("latent"), heads.index("score")
        rows = browser.js(COL.format(latent))
        alive = sorted({*EXCLUSIVE_A, *EXCLUSIVE_B})
        assert sorted(map(int, rows)) == alive
        assert rows[-1] == "3"  # NaN score sorts last
        browser.js(f"document.querySelectorAll('#candidates th')[{latent}].click()")  # numbers: descending
        assert list(map(int, browser.js(COL.format(latent)))) == sorted(alive, reverse=True)
        browser.js(f"document.querySelectorAll('#candidates th')[{latent}].click()")
        assert list(map(int, browser.js(COL.format(latent)))) == alive
        for reverse in (True, False):  # descending first, then ascending; the NaN score stays last
            browser.js(f"document.querySelectorAll('#candidates th')[{score}].click()")
            scores = browser.js(COL.format(score))
            assert scores[-1] == "—"
            assert [float(s) for s in scores[:-1]] == sorted((float(s) for s in scores[:-1]), reverse=reverse)
        # 8 candidates' and 1 shared latent's pages, the 2 differences (0 and 36) in the headline and its table
        assert browser.js("document.querySelectorAll('a[href^=\"features/\"]').length") == 13
        assert browser.js("window.__pwned === undefined && document.scripts.length === 1")
        calib = "Array.from(document.querySelectorAll('h2')).find(h => h.textContent === 'Calibration')"
        assert (
            browser.js(f"{calib}.nextElementSibling.nextElementSibling.querySelectorAll('tbody tr').length")
            == 2
        )
        lead = browser.js("document.querySelector('.headline .lead').textContent")
        assert lead.startswith("2 behavioural differences verified out of 8 candidates")
        # The map of candidates: one dot per candidate with a density (8) plus the 5 legend dots.
        assert browser.js("document.querySelector('figure svg').querySelectorAll('circle').length") == 8 + 5
        browser.goto((run / "report" / "features" / "0.html").as_uri())
        # The evidence pictures (the shift against its null, per context, the histogram) are drawn.
        sizes = browser.js(
            "Array.from(document.querySelectorAll('figure svg')).map(s => s.getBoundingClientRect().width)"
        )
        assert len(sizes) == 3 and min(sizes) > 200, sizes
        assert browser.js("document.querySelectorAll('dfn').length") == browser.js(
            "new Set(Array.from(document.querySelectorAll('dfn')).map(d => d.dataset.term)).size"
        )
        assert browser.js("document.querySelector('h1').textContent").startswith("Latent 0")
        assert browser.js("document.querySelectorAll('.example mark')[0].textContent") == XSS
        assert browser.js("document.querySelectorAll('.tok.hl').length") == 4  # 3 examples, 2 distinct
        assert browser.js("window.__pwned === undefined && document.scripts.length === 1")
        assert not browser.errors(), browser.errors()
    finally:
        browser.close()


def test_a_model_in_a_generic_folder_is_named_with_its_parent():
    from crossdiff.report.frame import short_model

    assert short_model("/tmp/organism-chess/model") == "organism-chess/model"
    assert short_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert short_model("gemma3-270m") == "gemma3-270m"
    assert short_model("runs/x/model/") == "x/model"
