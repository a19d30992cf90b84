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
