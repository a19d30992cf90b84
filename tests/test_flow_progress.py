"""Progress reporting and log lines of flows.progress (no Prefect server needed)."""

import logging
import time

from flows.progress import (FileCounter, Progress, StageProgress, StageTracker, StepCounter, artifact_sink,
                            format_detail, parse_detail)
from pipeline.tracking import MemoryTracker


class FakeArtifacts:
    def __init__(self):
        self.created, self.updates = [], []

    def create(self, progress, key=None, description=None):
        self.created.append((progress, key))
        return "artifact-1"

    def update(self, artifact_id, progress, description=None):
        self.updates.append(progress)
        self.descriptions = getattr(self, "descriptions", []) + [description]


def test_progress_is_monotone_throttled_and_finishes_at_100():
    fake = FakeArtifacts()
    progress = Progress("k", "d", min_interval_s=3600, create=fake.create, update=fake.update)
    progress.set(0.25)
    progress.set(0.5)      # throttled: remembered, not sent
    progress.set(0.1)      # never goes back
    assert fake.created == [(0.0, "k")] and fake.updates == [25.0]
    assert progress.percent == 50.0
    progress.finish()
    assert fake.updates[-1] == 100.0


def test_step_counter_over_units():
    counter = StepCounter(steps_per_unit=10, units=2)
    assert counter.observe("sanet", 5) == 0.25
    assert counter.observe("fcn", 10) == 0.75
    assert counter.observe("sanet", 3) == 0.75   # an older step changes nothing
    assert counter.observe("sanet", 50) == 1.0   # clipped per unit
    epochs = StepCounter(4, prefix="epoch/")
    assert epochs.counts({"epoch/loss": 1.0}) and not epochs.counts({"step/loss": 1.0})


def test_file_counter_counts_matching_files(tmp_path):
    seen = []
    counter = FileCounter(tmp_path, "*.npy", total=4, report=seen.append, poll_s=0.01)
    (tmp_path / "a.npy").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    assert counter.count() == 1
    counter.start()
    time.sleep(0.2)
    counter.stop()
    counter.join(2)
    assert seen and seen[-1] == 0.25


def test_stage_tracker_forwards_logs_and_reports(caplog):
    inner = MemoryTracker("train_segmentor")
    fake = FakeArtifacts()
    progress = Progress("k", "d", min_interval_s=0, create=fake.create, update=fake.update)
    logger = logging.getLogger("test-stage-tracker")
    tracker = StageTracker(inner, "train_segmentor", logger,
                           progress=StageProgress("train_segmentor", 8, "iterations", (artifact_sink(progress),)),
                           steps=StepCounter(4, units=2), log_every_s=0)
    with caplog.at_level(logging.INFO, logger="test-stage-tracker"):
        tracker.log_params({"a": 1})
        sanet = tracker.child("sanet")
        sanet.log_metrics({"loss": 0.5}, step=2)
        tracker.child("fcn").log_metrics({"loss": 0.7}, step=4)
        tracker.log_metrics({"final": 1.0})  # no step: no line, no progress
        slow = StageTracker(MemoryTracker(), "train_classifier", logger, log_every_s=3600)
        slow.log_metrics({"step/loss": 2.0}, step=20)
        slow.log_metrics({"step/loss": 1.5}, step=21)    # thinned
        slow.log_metrics({"epoch/loss": 1.7}, step=1)    # another group: shown
    assert inner.params == {"a": 1}
    assert inner.children["sanet"].history("loss") == [0.5]
    assert fake.updates == [25.0, 75.0]
    assert fake.descriptions[-1] == "d: 6/8 iterations · loss=0.7"
    assert "train_segmentor/sanet step 2: loss=0.5" in caplog.text
    assert "step/loss=2" in caplog.text and "step/loss=1.5" not in caplog.text
    assert "train_classifier step 1: epoch/loss=1.7" in caplog.text
    assert tracker.child("sanet") is sanet
    tracker.close("FINISHED")
    assert inner.status == "FINISHED" and inner.children["fcn"].status == "FINISHED"


def test_detail_round_trips_through_the_artifact_description():
    text = format_detail(12, 40, "epochs", "step/loss=0.312")
    assert text == "12/40 epochs · step/loss=0.312"
    assert parse_detail(text) == (12, 40, "epochs", "step/loss=0.312")
    assert parse_detail(format_detail(3, 9, "images")) == (3, 9, "images", "")
    assert parse_detail("progress") is None


def test_stage_progress_counts_keeps_latest_metrics_and_survives_a_failing_sink():
    seen = []

    def broken(progress, final):
        raise RuntimeError("cosmetic")

    progress = StageProgress("train_classifier", 4, "epochs",
                             (broken, lambda p, final: seen.append((p.done, p.detail(), final))))
    progress.note({"step/loss": 0.5, "step/lr": 0.1, "flag": True})
    progress.count(1)
    progress.count(0)            # never goes back
    progress.finish()
    assert seen == [(1, "1/4 epochs · step/loss=0.5, step/lr=0.1", False),
                    (1, "1/4 epochs · step/loss=0.5, step/lr=0.1", False),
                    (4, "4/4 epochs · step/loss=0.5, step/lr=0.1", True)]
