"""Hub-ready crosscoder folders: one loader for a folder or a hub id, the model card, and `crossdiff push`
tested up to the upload call (huggingface_hub's HfApi replaced by a recorder; nothing leaves the machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossdiff.coder.crosscoder import Crosscoder, CrosscoderConfig
from crossdiff.core.errors import CrossdiffError
from crossdiff.interop import hub


def _run(tmp_path: Path) -> Path:
    cfg = CrosscoderConfig(
        d_a=8, d_b=10, n_latents=64, k=4, n_a_exclusive=4, n_b_exclusive=6,
        scale_a=0.5, scale_b=2.0, model_a="org/model-a", model_b="org/model-b", layer_a=3, layer_b=5,
    )  # fmt: skip
    run = tmp_path / "run"
    Crosscoder(cfg, generator=torch.Generator().manual_seed(0)).save_pretrained(run)
    (run / "eval.json").write_text(json.dumps({"fve_a": 0.81, "fve_b": 0.77, "tokens_trained": 12345}))
    (run / "analysis").mkdir()
    summary = {
        "fve_a": 0.8125, "fve_b": 0.7625, "dead_fraction": 0.171875,
        "counts": {"dead": 11, "shared": 47, "candidate_a": 3, "candidate_b": 3},
        "store": {"path": str(tmp_path / "store")},
    }  # fmt: skip
    (run / "analysis" / "summary.json").write_text(json.dumps(summary))
    (run / "verification").mkdir()
    counts = {"a": {"difference": 1, "inert": 2}, "b": {"difference": 0, "inert": 3}}
    (run / "verification" / "summary.json").write_text(json.dumps({"counts": counts}))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "meta.json").write_text(json.dumps({"corpus": "brown", "n_tokens": 100000}))
    (tmp_path / "diff.json").write_text(json.dumps({"budget": {"name": "small"}}))
    return run


def test_model_card_states_the_runs_facts(tmp_path):
    card = hub.model_card(_run(tmp_path))
    assert card.startswith("---\nlibrary_name: crossdiff")
    for fact in (
        "org/model-a, layer 3, width 8", "org/model-b, layer 5, width 10", "4 A-exclusive, 54 shared, 6 B-exclusive",
        "brown (100,000 aligned tokens", "small; 12,345 training tokens", "A 0.812, B 0.762", "17.2%",
        "candidate_a 3", "model A | difference 1, inert 2", "model B | difference 0, inert 3",
    ):  # fmt: skip
        assert fact in card, fact


def test_hub_id_and_local_folder_load_through_one_path(tmp_path, monkeypatch):
    import huggingface_hub

    run = _run(tmp_path)
    calls = []

    def fake_download(repo_id, revision=None, **kw):
        calls.append((repo_id, revision))
        return str(run)  # what snapshot_download returns: the cached folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    local = hub.load_crosscoder(run)
    remote = hub.load_crosscoder("someone/crosscoder", revision="v1")
    assert calls == [("someone/crosscoder", "v1")]
    for k, v in local.state_dict().items():
        assert torch.equal(v, remote.state_dict()[k])
    with pytest.raises(CrossdiffError, match="neither an existing file or folder nor a Hugging Face hub id"):
        hub.resolve(str(tmp_path / "missing" / "deeper" / "path"))


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, revision=None, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CrossdiffError, match="cannot download someone/x") as e:
        hub.resolve("someone/x")
    assert "\n" not in str(e.value)


class RecordingApi:
    """huggingface_hub.HfApi's two calls that push makes, recorded with the staged folder's contents."""

    calls: list = []

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, revision, commit_message):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, (folder / "README.md").read_text()))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_stages_the_folder_and_calls_upload(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from crossdiff.cli import main

    run = _run(tmp_path)
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert main(["push", str(run), "--repo-id", "me/my-crosscoder"]) == 0
    (create, upload) = RecordingApi.calls
    assert create == ("create_repo", "me/my-crosscoder", True, True)
    assert upload[2] == [
        "README.md", "analysis/summary.json", "cfg.json", "crosscoder.safetensors", "eval.json",
        "verification/summary.json",
    ]  # fmt: skip
    assert upload[3] == hub.model_card(run)
    assert "me/my-crosscoder/commit/abc" in capsys.readouterr().out


def test_push_without_access_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from crossdiff.cli import main

    class NoToken(RecordingApi):
        def create_repo(self, repo_id, private, exist_ok):
            raise PermissionError("401 Client Error: Unauthorized\nInvalid credentials")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    assert main(["push", str(_run(tmp_path)), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: cannot upload to me/x") and "huggingface-cli login" in err and "\n" not in err
    )


def test_bad_repo_id_is_refused(tmp_path):
    with pytest.raises(CrossdiffError, match="owner/name"):
        hub.PushConfig(run=str(tmp_path), repo_id="no-slash")


def test_export_hub_folder_is_loadable_and_carries_the_card(tmp_path):
    from crossdiff.interop.export import ExportConfig, export

    run = _run(tmp_path)
    out = export(ExportConfig(run=str(run), to="hub", out=str(tmp_path / "hubfolder")))
    assert (out / "README.md").read_text() == hub.model_card(run)
    assert (out / "crosscoder.safetensors").read_bytes() == (run / "crosscoder.safetensors").read_bytes()
    hub.load_crosscoder(out)


def test_import_of_a_crossdiff_hub_id_copies_its_bytes(tmp_path, monkeypatch):
    """crossdiff import OWNER/NAME: the downloaded crossdiff folder becomes a run, byte for byte."""
    import huggingface_hub

    from crossdiff.interop.importer import ImportConfig, import_crosscoder

    run = _run(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, **kw: str(run))
    out = import_crosscoder(ImportConfig(source="someone/crosscoder", out=str(tmp_path / "imported")))
    for name in ("crosscoder.safetensors", "cfg.json", "eval.json"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    assert json.loads((out / "import.json").read_text())["source"] == "someone/crosscoder"
    with pytest.raises(CrossdiffError, match="already holds a crosscoder"):
        import_crosscoder(ImportConfig(source="someone/crosscoder", out=str(out)))
