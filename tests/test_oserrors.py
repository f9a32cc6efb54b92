"""Operating-system errors a user can fix are one line with the path and the fix (the CLI turns them
into `error: …`, exit status 2), and no temporary file or folder outlives a failed write."""

from __future__ import annotations

import errno
import subprocess

import pytest
import torch

from crossdiff import cli
from crossdiff.coder.runlog import save_checkpoint
from crossdiff.coder.train import TrainConfig, _initialise
from crossdiff.core.errors import CrossdiffError
from crossdiff.inputs.store import Store, write_synthetic_store


@pytest.fixture
def store(tmp_path):
    g = torch.Generator().manual_seed(0)
    return write_synthetic_store(
        tmp_path / "store", torch.randn(512, 8, generator=g), torch.randn(512, 6, generator=g)
    )


def _train_argv(store, out):
    return [
        "train",
        "--store",
        str(store.root),
        "--out",
        str(out),
        "--latents",
        "16",
        "--k",
        "2",
        "--tokens",
        "128",
    ]


def test_out_that_is_a_regular_file_is_one_line(store, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file\n")
    assert cli.main(_train_argv(store, tmp_path / "taken")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {tmp_path / 'taken'}: a file stands where a folder is needed; "
        "choose a path whose folders are folders, not files"
    ]


def test_read_only_out_is_one_line(store, tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert cli.main(_train_argv(store, mnt / "run")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {mnt / 'run'}"), err
        assert "the file system is read-only; choose a folder on a writable disk" in err[0]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_full_disk_while_writing_a_checkpoint_leaves_no_temporary(store, tmp_path, monkeypatch):
    cfg = TrainConfig(
        store=str(store.root), out=str(tmp_path / "run"), latents=16, k=2, tokens=128, batch_size=64
    )
    st = _initialise(cfg, Store.open(store.root), torch.device("cpu"))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the disk fills up half-way through the trainer state
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CrossdiffError, match="no space left on the device while writing"):
        save_checkpoint(tmp_path / "run", st)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
