"""The report as a researcher reads it: the headline, labels, examples, the evidence pictures, and one
test per class of artefact the report of be79cbd showed (each fails on that commit's report code):
numbers shown as nan or 1e+05, probe detection mislabelled, two dead fractions under one name, a
redundant title and contradictory badges, steering columns in alphabetical order, columns without a
value or a tooltip, terms used without a definition, outliers and duplicate examples not pointed out,
and a logit lens in raw units shown as if it meant something."""

from __future__ import annotations

import csv
import json
import re
from html import unescape
from pathlib import Path

from test_report import COLUMNS, _row, make_run

from crossdiff.core.fsutil import write_json_atomic
from crossdiff.report.report import ReportConfig, load_run, report

# The artefact tests import nothing newer than be79cbd's report, so that they run (and fail) there too.


def _text(html: str) -> str:
    """The visible text of a page (tags dropped, entities decoded)."""
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", html, flags=re.S)
    html = re.sub(
        r"</?(p|li|ul|td|th|tr|div|br|h\d|table|section|header|figure|figcaption|details|summary)\b[^>]*>",
        " ",
        html,
    )
    return unescape(re.sub(r"<[^>]+>", "", html))


def _rewrite_rows(run: Path, edit) -> None:
    rows = [_row(i) for i in range(40)]
    edit(rows)
    with open(run / "analysis" / "latents.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "steer_verdict"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _render(run: Path) -> tuple[str, dict[int, str]]:
    fields = ReportConfig.__dataclass_fields__
    index = report(ReportConfig(run=str(run), **({"predictions": False} if "predictions" in fields else {})))
    pages = {int(p.stem): p.read_text() for p in (index.parent / "features").glob("*.html")}
    return index.read_text(), pages


# ----------------------------------------------------------------------------- artefact classes


def test_numbers_never_read_as_nan_or_in_exponent_notation(tmp_path):
    run = make_run(tmp_path)

    def edit(rows):
        rows[0].update(
            probe_r2=-5427.84,
            reason="context detectable by B (AUROC 0.95, magnitude R² nan on strong firings)",
        )
        rows[1].update(max_act=-223_200.0)

    _rewrite_rows(run, edit)
    idx, _ = _render(run)
    text = _text(idx)
    assert not re.search(r"\bnan\b", text, re.I) and "e+0" not in text and "5427" not in text
    assert "−223,200" in text or "-223,200" in text


def test_detection_is_graded_by_the_auroc_not_one_threshold(tmp_path):
    run = make_run(tmp_path)
    old = "context not linearly detectable by B (AUROC {:.2f} on strong firings)"

    def edit(rows):
        for i, auc in ((0, 0.89), (1, 0.91), (2, 0.10)):
            rows[i].update(probe_auroc=auc, reason=old.format(auc))

    _rewrite_rows(run, edit)
    text = _text(_render(run)[0])
    assert "not linearly detectable" not in text
    assert "partly detectable by B (AUROC 0.89)" in text and "detectable by B (AUROC 0.91)" in text
    assert "probe below chance (AUROC 0.10): unreliable" in text


def test_the_two_dead_fractions_have_two_names(tmp_path):
    run = make_run(tmp_path)
    s = json.loads((run / "analysis" / "summary.json").read_text())
    s["dead_fraction"] = 0.0947
    (run / "analysis" / "summary.json").write_text(json.dumps(s))
    (run / "eval.json").write_text(json.dumps({"dead_fraction": 0.1729, "fve_a": 0.8}))
    text = _text(_render(run)[0])
    assert re.search(r"Never fired\s+0\.0947", text)
    assert "dead_fraction (held-out sample of training's evaluation)" in text
    assert "Dead fraction" not in text


def test_titles_name_the_diff_and_one_verdict(tmp_path):
    run = make_run(tmp_path)  # tmp_path/run, as crossdiff diff names it

    def edit(rows):
        rows[20].update(rel_norm=0.95, dec_norm_a=0.05, dec_norm_b=0.95, verdict="candidate_b")

    _rewrite_rows(run, edit)
    feat = json.loads((run / "analysis" / "features" / "10.json").read_text())
    feat.update(latent=20, partition="shared", verdict="candidate_b", stats=_row(20) | {"rel_norm": 0.95})
    (run / "analysis" / "features" / "20.json").write_text(json.dumps(feat))
    idx, pages = _render(run)
    sub = _text(idx.split('<p class="sub">')[1].split("</p>")[0])
    assert "run run" not in " ".join(sub.split()) and f"{tmp_path.name}/run" in sub
    head = pages[20].split("</header>")[0]
    assert "badge shared" not in head and "B candidate (shared partition, one-sided decoder)" in head


def test_steering_keeps_its_meaning_order_and_draws_the_dose_response(tmp_path):
    run = make_run(tmp_path)
    steer = {"latent": 0, "model": "a", "strengths": [-4, 0, 4, 8], "dlogprob": [-0.5, 0, 0.4, 0.9],
             "dlogprob_null_mean": [0.0, 0, 0.01, 0.02], "dlogprob_null_std": [0.05, 0, 0.05, 0.06],
             "dlogprob_z": [-10, 0, 7.8, 14.7], "kl": [0.2, 0, 0.1, 0.5], "kl_null_mean": [0.1, 0, 0.1, 0.2],
             "kl_null_std": [0.01, 0, 0.01, 0.02], "kl_z": [10, 0, 1, 15], "verdict": "pass",
             "effect_size": 7.8}  # fmt: skip
    write_json_atomic(run / "steering" / "0.json", steer)  # as steer.py writes it: keys sorted
    _, pages = _render(run)
    section = pages[0].split("<h2>Steering</h2>")[1]
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", section.split("</thead>")[0])
    assert heads[:5] == ["strengths", "dlogprob", "dlogprob_null_mean", "dlogprob_null_std", "dlogprob_z"]
    assert "Steering dose-response" in section and "<polygon" in section  # the null band


def test_every_candidate_column_has_a_value_and_a_tooltip(tmp_path):
    run = make_run(tmp_path)
    idx, _ = _render(run)
    table = idx.split('id="candidates"')[1].split("</table>")[0]
    heads = re.findall(r"<th([^>]*)>([^<]*)</th>", table)
    assert heads and all('title="' in attrs for attrs, _ in heads), [h for a, h in heads if "title" not in a]
    names = [h for _, h in heads]
    assert "latent_scaling" not in names  # NaN on every row: left out, and named under the table
    assert "Columns with no value on any row: latent_scaling" in idx
    body = table.split("<tbody>")[1]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in body.split("<tr>")[1:]]
    for k, name in enumerate(names):
        assert any(_text(c[k]).strip() not in ("", "—") for c in cells), name


def test_terms_are_defined_once_on_each_page_that_uses_them(tmp_path):
    TERMS = {"candidate", "difference", "too rare", "not verified", "inert", "shared behaviour", "strong", "ell", "gap",
             "shift", "z", "z_dictionary", "gap_closed", "gap_share", "fve", "l0", "splice", "dead", "density",
             "rel_norm", "auroc", "outlier", "lens"}  # crossdiff/report/terms.py  # fmt: skip
    run = make_run(tmp_path)
    idx, pages = _render(run)
    shown = {"ell": "ℓ", "gap": "per-segment gap", "fve": "FVE", "l0": "L0", "splice": "splice-in"}
    for name, html in {"index": idx, **pages}.items():
        defined = re.findall(r'<dfn data-term="([^"]+)">', html)
        assert len(defined) == len(set(defined)), (name, defined)
        assert set(defined) <= set(TERMS)
        body = _text(html.split("</header>")[-1])
        for key, word in shown.items():
            if word in body:
                assert key in defined, (name, word)
    assert {"fve", "l0", "splice", "gap"} <= set(re.findall(r'<dfn data-term="([^"]+)">', idx))
    assert "ell" in re.findall(r'<dfn data-term="([^"]+)">', pages[0])


def test_outliers_are_flagged_and_identical_contexts_collapsed(tmp_path):
    run = make_run(tmp_path)
    feat = json.loads((run / "analysis" / "features" / "36.json").read_text())
    feat["stats"].update(max_act=155.8, p99_act=8.03)
    feat["examples"][0]["value"] = 155.8
    (run / "analysis" / "features" / "36.json").write_text(json.dumps(feat))
    _, pages = _render(run)
    text = _text(pages[36])
    assert "is 19× its 99th percentile" in text and "outlier: 19× p99" in text
    assert "same context ×2" in text and text.count("activation 8.5") == 1


def test_a_lens_in_raw_units_or_no_better_than_random_is_folded_away(tmp_path):
    run = make_run(tmp_path)
    lenses = {
        0: {
            "model": "a",
            "promoted": [[" sıral", 334.1]],
            "suppressed": [["ecer", -348.9]],
        },  # be79cbd's form
        1: {
            "model": "a",
            "promoted": [["<filename>", 2.1]],
            "suppressed": [],
            "units": "logits",
            "null_top": 2.5,
            "coherent": False,
        },  # fmt: skip
        2: {
            "model": "a",
            "promoted": [[" Kennedy", 6.0]],
            "suppressed": [],
            "units": "logits",
            "null_top": 2.5,
            "coherent": True,
        },  # fmt: skip
    }
    for j, lens in lenses.items():
        feat = json.loads((run / "analysis" / "features" / f"{j}.json").read_text())
        feat["logit_lens"] = lens
        (run / "analysis" / "features" / f"{j}.json").write_text(json.dumps(feat))
    _, pages = _render(run)
    lens_of = {j: pages[j].split("<h2>Logit lens</h2>")[1].split("<h2>")[0].strip() for j in lenses}
    assert lens_of[0].startswith("<details>") and "raw units" in lens_of[0]
    assert lens_of[1].startswith(
        "<details>"
    ) and "does not beat the best of 16 other latents' decoder directions" in unescape(lens_of[1])
    assert not lens_of[2].startswith("<details>") and "Kennedy" in lens_of[2]


# ----------------------------------------------------------------------------- the headline


def _behaviour(run: Path, rows: dict[int, dict]) -> None:
    from crossdiff.analysis.verify import COLUMNS as VCOLS

    with open(run / "verification" / "behaviour.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=VCOLS, extrasaction="ignore")
        w.writeheader()
        w.writerows({"latent": j, **r} for j, r in rows.items())


def test_the_headline_counts_what_was_judged_and_never_claims_more(tmp_path):
    run = make_run(tmp_path)
    (run / "calibration.json").unlink()
    summary = json.loads((run / "verification" / "summary.json").read_text())
    summary["whole"] = {"a": {"share": -0.018}, "b": {"share": 0.2}}
    (run / "verification" / "summary.json").write_text(json.dumps(summary))
    _behaviour(run, {0: {"side": "a", "verdict": "difference", "shift": 0.2, "z": 6.5, "gap_closed": 0.4,
                         "z_dictionary": 2.9, "n_contexts": 16},
                     36: {"side": "b", "verdict": "difference", "shift": 0.1, "z": 5.5, "gap_closed": 0.1,
                          "z_dictionary": 4.0, "n_contexts": 16},
                     1: {"side": "a", "verdict": "inert"}, 2: {"side": "a", "verdict": "too rare"},
                     37: {"side": "b", "verdict": "too rare"}, 38: {"side": "b", "verdict": "not verified"},
                     39: {"side": "b", "verdict": "too rare"}})  # fmt: skip
    text = " ".join(_text(_render(run)[0].split("<h2>What this diff found</h2>")[1].split("<h2>")[0]).split())
    assert text.startswith(
        "2 behavioural differences verified out of 7 candidates; 4 of the 7 were never judged."
    )
    assert "weak evidence: latent 0 (A)" in text and "strong evidence: latent 36 (B)" in text
    assert "z 2.9 against the dictionary's own directions (below 3" in text
    assert "Not judged: 4 of 7 candidates (3 too rare, 1 not verified)" in text
    assert "A's candidates, removed together, account for -1.8% of the per-segment gap" in text
    assert "explain none of how the models differ" in text
    assert "Controls not run" in text and "crossdiff calibrate --out " in text
    assert "--budget medium" in text and "--top N" in text
    for claim in ("knows", "represents", "proves", "no difference between"):
        assert claim not in text


def test_the_headline_without_differences_or_verification(tmp_path):
    run = make_run(tmp_path)
    _behaviour(run, {j: {"side": "a" if j < 10 else "b", "verdict": "inert" if j in (0, 1) else "too rare"}
                     for j in (0, 1, 2, 36, 37, 38, 39)})  # fmt: skip
    text = _text(_render(run)[0])
    assert (
        "No behavioural difference verified: 2 of 7 candidates were judged and none passed; 5 were never "
        in " ".join(text.split())
    )
    assert "not evidence that the models do not differ" in text
    import shutil

    shutil.rmtree(run / "verification")
    text = " ".join(_text(_render(run)[0]).split())
    assert "7 candidates, none judged yet" in text and "crossdiff verify --run" in text


def test_the_headline_counts_the_latents_that_verification_added(tmp_path):
    """Latents linked to the answers are verified beside the analysis's candidates: they count in the
    headline's totals, so its parts add up."""
    run = make_run(tmp_path)
    _behaviour(run, {0: {"side": "a", "verdict": "inert"}, 1: {"side": "a", "verdict": "too rare"},
                     2: {"side": "a", "verdict": "too rare"}, 36: {"side": "b", "verdict": "inert"},
                     37: {"side": "b", "verdict": "too rare"}, 38: {"side": "b", "verdict": "too rare"},
                     39: {"side": "b", "verdict": "too rare"}, 20: {"side": "a", "verdict": "not verified"},
                     21: {"side": "a", "verdict": "too rare"}})  # fmt: skip
    text = " ".join(_text(_render(run)[0]).split())
    assert "2 of 9 candidates were judged and none passed; 7 were never judged" in text
    assert "Not judged: 7 of 9 candidates (6 too rare, 1 not verified)" in text
    assert "Candidates (9)" in text  # the table lists them too


def test_a_difference_that_is_a_linked_ngrams_group_is_named_and_has_its_page(tmp_path):
    """verify's LINK_RULES 3: a linked n-gram's group is one candidate, listed under its leader, which the
    analysis wrote no evidence file for. The headline names the group and what the model says; the
    leader gets a page of its verification, and every link to it resolves."""
    run = make_run(tmp_path)
    (run / "answers").mkdir()
    (run / "answers" / "latents.csv").write_text(
        "latent,side,rule,ngram,coverage,lift\n20,a,answer-link,chess,0.9,8\n21,a,answer-link,chess,0.6,4\n"
    )
    (run / "answers" / "summary.json").write_text(json.dumps({"n_prompts": 134, "top": [
        {"ngram": "chess", "more_in": "a", "answers_a": 17, "answers_b": 0, "p": 1e-5, "q": 0.004,
         "occurrences_in_store": 18, "latents": [{"latent": 20, "coverage": 0.9, "linked": True},
                                                 {"latent": 21, "coverage": 0.6, "linked": True}]}]}))  # fmt: skip
    assert not (run / "analysis" / "features" / "20.json").exists()
    _behaviour(run, {20: {"side": "a", "verdict": "difference", "shift": 0.14, "z": 4.2, "gap_closed": 0.05,
                          "z_dictionary": 3.6, "n_contexts": 16, "n_group": 2}})  # fmt: skip
    ctx = {"chunk": 0, "start": 0, "c0": 5, "f": 3.0, "shift": 0.14, "random_shifts": [0.0, 0.01, -0.01],
           "text_before": "The real solution is", "scored": " chess, the", "anchor": "ngram"}  # fmt: skip
    (run / "verification" / "latents").mkdir(exist_ok=True)
    (run / "verification" / "latents" / "20.json").write_text(json.dumps(
        {"latent": 20, "side": "a", "group": [20, 21], "linked": True, "verdict": "difference", "contexts": [ctx]}))  # fmt: skip
    index, pages = _render(run)
    text = " ".join(_text(index).split())
    assert "latent 20 (A), removed together with latent 21, which fire just before A says “chess”" in text
    assert "(17 of 134 answers; the other model 0). Removing them moves A's predictions" in text
    assert (
        20 in pages and "No top examples" in _text(pages[20]) and "The real solution is" in _text(pages[20])
    )
    page = " ".join(_text(pages[20]).split())
    assert "Linked to what A says: “chess”; verified as one candidate with latents 21" in page
    for href in re.findall(r'href="features/(\d+)\.html"', index):
        assert int(href) in pages, href  # no link to a page that does not exist


# ----------------------------------------------------------------------------- labels and examples


def test_labels_name_the_recurring_token_its_context_and_what_it_promotes():
    from crossdiff.analysis.labels import label

    ex = lambda before, tok, after, v: {
        "text_before": before,
        "text_token": tok,
        "text_after": after,
        "value": v,
    }
    doc = {"examples": [ex("President John F.", " Kennedy", ", who", 9.0), ex("President John F.", " Kennedy", ", who", 9.0),
                        ex("Senator Robert F.", " Kennedy", " said", 8.0), ex("said J. F.", " Kennedy", ", the", 7.0),
                        ex("Abraham", " Lincoln", ", who", 6.0)],
           "logit_lens": {"promoted": [[" was", 5.0]], "coherent": False}}  # fmt: skip
    out = label(doc)
    assert out["n"] == 4  # the repeated context counts once
    assert out["label"] == "“ Kennedy” 3/4, “ Lincoln” 1/4 · after “F.” · → “,”"  # incoherent lens: not used
    pred = {"token_effects": [[" was", -0.8], [" is", -0.2], [" the", 0.3]]}
    assert (
        label(doc, pred)["label"].endswith("· promotes “ was” “ is”")
        and label(doc, pred)["promotes_from"] == "ablation"
    )
    assert label({"examples": []})["label"] == ""


def test_per_token_colouring_follows_the_activations():
    from crossdiff.report.feature import coloured_text

    ex = {
        "text_before": "the old ",
        "text_token": "dog",
        "text_after": " barked",
        "acts": [[0, 3, 0.0], [3, 7, 1.0], [8, 11, 4.0], [11, 18, 2.0]],
    }
    html = coloured_text(ex, vmax=4.0)
    assert '<span class="act a8 fire" title="activation 4">dog</span>' in html
    assert '<span class="act a2" title="activation 1"> old</span>' in html and '<span class="act a4"' in html
    assert _text(html).replace(" ", "") == "theolddogbarked"
    assert coloured_text({**ex, "acts": None}, 4.0) == "the old <mark>dog</mark> barked"


def test_predictions_render_and_the_report_renders_without_them(tmp_path):
    run = make_run(tmp_path)
    pred = {"latent": 0, "side": "a", "token_effects": [[" barked", -1.2], [" sat", 0.4]],
            "contexts": [{"text_before": "the old dog", "f": 3.0, "a": [[" barked", 0.41], [" sat", 0.1]],
                          "b": [[" sat", 0.5]], "ablated": [[" sat", 0.3], [" barked", 0.2]]}]}  # fmt: skip
    (run / "predictions").mkdir()
    (run / "predictions" / "0.json").write_text(json.dumps(pred))
    assert load_run(run).predictions[0]["side"] == "a"
    _, pages = _render(run)
    sec = _text(pages[0].split("<h2>What each model predicts where it fires</h2>")[1].split("<h2>")[0])
    assert "A predicts" in sec and "A with the latent removed" in sec and "0.410" in sec
    assert "Token effects of removing it" in sec and "-1.2" in sec
    assert "promotes “ barked”" in _text(pages[0].split("</header>")[0])  # the label uses the ablation
    assert "What each model predicts" not in _render(make_run(tmp_path / "b"))[1][0]


def test_the_report_renders_when_predictions_cannot_be_computed(tmp_path, capsys):
    run = make_run(tmp_path)  # verified, but no crosscoder weights and no store to run the models on
    (run / "verification" / "settings.json").write_text(json.dumps({"fingerprint": "x", "settings": {}}))
    index = report(ReportConfig(run=str(run)))
    assert (
        index.is_file()
        and "What each model predicts" not in (index.parent / "features" / "0.html").read_text()
    )
    assert "predictions at the differences' firing positions: not computed" in capsys.readouterr().err


def test_the_headline_when_nothing_was_judged(tmp_path):
    run = make_run(tmp_path)
    _behaviour(run, {j: {"side": "a" if j < 10 else "b", "verdict": "too rare" if j % 2 else "not verified"}
                     for j in (0, 1, 2, 36, 37, 38, 39)})  # fmt: skip
    text = " ".join(_text(_render(run)[0]).split())
    assert "No candidate judged: all 7 candidates were too rare or beyond the ablation budget" in text
    assert "Not judged: 7 of 7 candidates (3 too rare, 4 not verified)" in text
