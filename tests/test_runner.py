"""The plain stage runner: keys, caching, resume, force, dependency resolution."""

import os
import sys
import types
from pathlib import Path

import pytest

import stages
from pipeline.config import load_config
from pipeline.storage import StageResult, is_complete
from pipeline.tracking import MemoryTracker


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace the five stage modules by recorders that write one file each."""
    calls = []

    def make(name):
        module = types.ModuleType(f"stages.{name}")

        def run(config, upstream, out_dir, tracker):
            calls.append(name)
            (Path(out_dir) / "out.txt").write_text(",".join(sorted(upstream)))
            tracker.log_metrics({"value": 1.0})
            return StageResult(stage=name, key="", path=str(out_dir), metrics={"value": len(calls)})

        module.run = run
        return module

    for name in stages.STAGE_ORDER:
        monkeypatch.setitem(sys.modules, f"stages.{name}", make(name))
    return calls


def config(tmp_path, *overrides):
    return load_config("demo", [f"workdir={tmp_path}", *overrides])


def test_all_stages_then_cached(tmp_path, fake_stages):
    results = stages.run_pipeline(config(tmp_path))
    assert fake_stages == list(stages.STAGE_ORDER)
    assert all(is_complete(Path(r.path)) for r in results.values())
    assert Path(results["evaluate"].path, "out.txt").read_text() == \
        "generate_cams,refine_crf,train_segmentor"
    again = stages.run_pipeline(config(tmp_path))
    assert fake_stages == list(stages.STAGE_ORDER)          # nothing recomputed
    assert all(r.cached for r in again.values())
    assert again["refine_crf"].metrics == results["refine_crf"].metrics


def test_changing_crf_recomputes_3_to_5_only(tmp_path, fake_stages):
    first = stages.run_pipeline(config(tmp_path))
    fake_stages.clear()
    second = stages.run_pipeline(config(tmp_path, "crf.iterations=3"))
    assert fake_stages == ["refine_crf", "train_segmentor", "evaluate"]
    assert second["generate_cams"].key == first["generate_cams"].key
    assert second["refine_crf"].key != first["refine_crf"].key
    assert second["evaluate"].key != first["evaluate"].key


def test_single_stage_rerun_reuses_upstream_and_force(tmp_path, fake_stages):
    stages.run_pipeline(config(tmp_path))
    fake_stages.clear()
    results = stages.run_pipeline(config(tmp_path), stages=["refine_crf"])
    assert set(results) == {"train_classifier", "generate_cams", "refine_crf"}
    assert fake_stages == []
    results = stages.run_pipeline(config(tmp_path), stages=["refine_crf"], force=True)
    assert fake_stages == ["refine_crf"]
    assert results["generate_cams"].cached and not results["refine_crf"].cached


def test_deleted_output_is_recomputed_and_incomplete_resumed(tmp_path, fake_stages):
    first = stages.run_pipeline(config(tmp_path))
    import shutil
    shutil.rmtree(first["refine_crf"].path)
    (Path(first["train_segmentor"].path) / "COMPLETE").unlink()
    fake_stages.clear()
    stages.run_pipeline(config(tmp_path))
    assert fake_stages == ["refine_crf", "train_segmentor"]


def test_tracker_children_per_stage(tmp_path, fake_stages):
    tracker = MemoryTracker()
    stages.run_pipeline(config(tmp_path), stages=["train_classifier"], tracker=tracker)
    assert list(tracker.children) == ["train_classifier"]
    assert tracker.children["train_classifier"].history("value") == [1.0]


def test_unknown_stage_name():
    with pytest.raises(ValueError, match="unknown stage.*choose from"):
        stages.check_stage_names(["refine"])


def test_execution_fields_do_not_change_keys(tmp_path):
    base = load_config("demo", [f"workdir={tmp_path}"])
    other = load_config("demo", [f"workdir={tmp_path}", "crf.workers=2", "crf.chunk_size=3",
                                 "maps.workers=2", "segmentor.num_workers=1"])
    for name in ("refine_crf", "generate_cams", "train_segmentor"):
        ups = {u: "k" for u in stages.STAGES[name].upstream}
        assert stages.stage_key(base, name, ups) == stages.stage_key(other, name, ups)
    changed = load_config("demo", [f"workdir={tmp_path}", "crf.iterations=2"])
    assert stages.stage_key(base, "refine_crf", {"generate_cams": "k"}) != \
        stages.stage_key(changed, "refine_crf", {"generate_cams": "k"})


def test_threads_setting_reaches_the_stage_and_is_not_in_the_key(tmp_path, fake_stages, monkeypatch):
    import torch

    from pipeline import runtime

    seen = []
    module = sys.modules["stages.refine_crf"]
    inner = module.run

    def run(config, upstream, out_dir, tracker):
        seen.append(torch.get_num_threads())
        return inner(config, upstream, out_dir, tracker)

    monkeypatch.setattr(module, "run", run)
    before = torch.get_num_threads()
    try:
        first = stages.run_pipeline(config(tmp_path, "threads=1"), stages=["refine_crf"])
        assert seen == [1]
        # an execution setting: the same outputs are reused at another thread count
        again = stages.run_pipeline(config(tmp_path, "threads=2"), stages=["refine_crf"])
        assert again["refine_crf"].cached and again["refine_crf"].key == first["refine_crf"].key
    finally:
        torch.set_num_threads(before)
    assert runtime.cpu_threads(3) == 3
    assert runtime.cpu_threads(None) == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="threads"):
        config(tmp_path, "threads=0")


# --------------------------------------------------------------------------- one lock
# `wsss run` in a subprocess whose stage 1 waits for a gate file before training, so the
# test decides when the first run may finish
_GATED_RUN = r"""
import sys, time
from pathlib import Path

import stages.train_classifier as stage

gate, real = Path(sys.argv[1]), stage.run

def gated(*args, **kwargs):
    while not gate.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)

stage.run = gated
from pipeline.cli import main
sys.exit(main(sys.argv[2:]))
"""

TINY_CLASSIFIER = ["data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.num_classes=3",
                   "data.synthetic.image_size=32", "classifier.image_size=32", "classifier.epochs=1",
                   "classifier.batch_size=4", "classifier.feature_channels=8",
                   "classifier.backbone_options={width: 4}", "classifier.lr_steps=[1]",
                   "classifier.num_workers=0", "device=cpu", "threads=1"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_same_config_wsss_runs_wait_for_each_other(tmp_path):
    """Two concurrent `wsss run` with one config: the second waits on the first's stage lock
    (saying so, with the holder's pid), then reuses its complete output instead of training
    again; both exit 0 and report the same output."""
    import subprocess

    from pipeline.data import generate_synthetic
    from pipeline.storage import lock_path

    cfg = config(tmp_path, f"data.root={tmp_path / 'data'}", *TINY_CLASSIFIER)
    generate_synthetic(cfg.data.root, cfg.data.synthetic)
    key = stages.stage_key(cfg, "train_classifier", {})
    lock = lock_path(cfg.workdir, "train_classifier", key)
    gate = tmp_path / "gate"
    argv = ["run", "--stages", "train_classifier", "--set", f"workdir={tmp_path}",
            "--set", f"data.root={tmp_path / 'data'}"] + [a for o in TINY_CLASSIFIER for a in ("--set", o)]

    def start(name):
        log = (tmp_path / f"{name}.log").open("w")
        return subprocess.Popen([sys.executable, "-c", _GATED_RUN, str(gate), *argv],
                                stdout=log, stderr=subprocess.STDOUT, text=True)

    first = start("first")
    try:
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), 90,
                  "the first run to hold the stage lock")
        second = start("second")
        try:
            _wait_for(lambda: "waiting for" in (tmp_path / "second.log").read_text(), 90,
                      "the second run to wait")
            gate.touch()
            assert first.wait(90) == 0 and second.wait(90) == 0
        finally:
            second.kill()
    finally:
        gate.touch()
        first.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("first", "second")}
    assert f"held by pid {first.pid}" in logs["second"]
    out_dir = Path(cfg.workdir) / "train_classifier" / key
    assert f"train_classifier: done in" in logs["first"] and f"-> {out_dir}" in logs["first"]
    assert f"train_classifier: cached" in logs["second"] and f"-> {out_dir}" in logs["second"]
    assert is_complete(out_dir)
