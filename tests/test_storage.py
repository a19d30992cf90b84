"""Storage: provenance keys, atomic writes, manifests, completion markers."""

import os
import sys
import textwrap

import pytest

from pipeline.storage import (COMPLETE_MARKER, IncompleteStageError, atomic_path, atomic_write_json,
                              clean_temp_files, code_version, finish_stage, is_complete,
                              module_closure, open_stage_output, provenance_key, stage_dir)


def test_key_depends_on_config_inputs_and_code():
    base = provenance_key({"a": 1}, {"up": "k1"}, "c1")
    assert base == provenance_key({"a": 1}, {"up": "k1"}, "c1")
    assert base != provenance_key({"a": 2}, {"up": "k1"}, "c1")
    assert base != provenance_key({"a": 1}, {"up": "k2"}, "c1")
    assert base != provenance_key({"a": 1}, {"up": "k1"}, "c2")
    # key order does not matter
    assert provenance_key({"a": 1, "b": 2}, {}, "c") == provenance_key({"b": 2, "a": 1}, {}, "c")


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A throwaway `stages`-like package tree: models/helper.py imported by stages_x."""
    root = tmp_path / "src"
    (root / "models").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("")
    (root / "models" / "fakehelper.py").write_text("VALUE = 1\n")
    (root / "models" / "fakestage.py").write_text("from .fakehelper import VALUE\nimport numpy\n")
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        monkeypatch.delitem(sys.modules, name)
    return root


def test_code_version_follows_project_imports(fake_package):
    files = {p.name for p in module_closure(["models.fakestage"])}
    assert files == {"fakestage.py", "fakehelper.py", "__init__.py"}
    before = code_version(["models.fakestage"])
    (fake_package / "models" / "fakehelper.py").write_text("VALUE = 2\n")
    assert code_version(["models.fakestage"]) != before


def test_atomic_path_keeps_target_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".txt" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_clean_temp_files(tmp_path):
    (tmp_path / ".img.abc.tmp.png").write_text("x")
    (tmp_path / "img.png").write_text("y")
    assert clean_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_incomplete_directory_is_refused(tmp_path):
    out = stage_dir(tmp_path, "refine_crf", "abc")
    with pytest.raises(IncompleteStageError, match="does not exist"):
        open_stage_output(out)
    out.mkdir(parents=True)
    atomic_write_json(out / "manifest.json", {"x": 1})
    assert not is_complete(out)
    with pytest.raises(IncompleteStageError, match="incomplete"):
        open_stage_output(out)
    finish_stage(out, {"metrics": {"miou": 0.5}})
    assert (out / COMPLETE_MARKER).is_file()
    assert open_stage_output(out)["metrics"]["miou"] == 0.5


def test_marker_written_after_manifest(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    finish_stage(tmp_path, {"a": 1})
    assert order == ["manifest.json", COMPLETE_MARKER]


def test_stage_lock_waits_names_the_holder_and_is_reentrant_per_thread(tmp_path):
    import threading
    import time

    from pipeline.storage import lock_path, stage_lock

    said, order = [], []
    with stage_lock(tmp_path, "refine_crf", "k1") as path:
        assert path == lock_path(tmp_path, "refine_crf", "k1")
        assert path.read_text().strip() == str(os.getpid())
        with stage_lock(tmp_path, "refine_crf", "k1"):          # nested in this thread: no wait
            order.append("nested")

        def other():
            with stage_lock(tmp_path, "refine_crf", "k1", say=said.append):
                order.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        order.append("released")
        with stage_lock(tmp_path, "refine_crf", "k2", say=said.append):   # another key: no wait
            pass
    thread.join(5)
    assert order == ["nested", "released", "other"]
    assert said[0].startswith(f"refine_crf: waiting for {path} held by pid {os.getpid()}")
    assert said[1].startswith("refine_crf: got the lock after")


@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """Every atomic write's temp file is a link to /dev/full, whose writes fail with a real
    ENOSPC from the kernel (the write wrapper of a full disk); mode changes go to a scratch
    file, never to the device."""
    import tempfile

    from pipeline import storage

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(tmp_path / "scratch", os.O_CREAT | os.O_WRONLY, 0o600), name

    monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
    return tmp_path


def _no_space_message(directory, name):
    return rf"^no space left on {directory} \(file system /\S*\) while writing {name}; \d+ MB free$"


def test_full_disk_names_the_file_and_the_space_left(full_disk, tmp_path):
    import numpy as np

    from pipeline.data.palette import save_label_png
    from pipeline.errors import DiskFullError

    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=_no_space_message(out, "manifest.json")) as info:
        atomic_write_json(out / "manifest.json", {"a": list(range(10000))})
    assert info.value.errno == 28 and isinstance(info.value, OSError)
    assert not list(out.iterdir())                          # no target, no temp left
    with pytest.raises(DiskFullError, match=_no_space_message(out, "mask.png")):   # PIL writes
        save_label_png(out / "mask.png", np.zeros((64, 64), np.uint8))
    assert not list(out.iterdir())


def test_full_disk_during_a_checkpoint_write(full_disk, tmp_path):
    import torch

    from pipeline.errors import DiskFullError
    from pipeline.runtime import save_checkpoint

    with pytest.raises(DiskFullError, match=_no_space_message(tmp_path / "ckpt", "epoch_3.pt")):
        save_checkpoint(tmp_path / "ckpt" / "epoch_3.pt", {"w": torch.zeros(200_000)})
    assert not list((tmp_path / "ckpt").iterdir())


def test_full_disk_error_survives_a_worker_process():
    import pickle

    from pipeline.errors import DiskFullError, disk_full_error

    from pathlib import Path

    err = pickle.loads(pickle.dumps(disk_full_error(Path("/tmp/x/y.png"))))
    assert isinstance(err, DiskFullError) and str(err).startswith("no space left on /tmp/x")


def test_atomic_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    atomic_write_json(tmp_path / "b.json", {})
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o666 & ~old
