"""Terminal progress: plain lines off a terminal (``wsss run`` in CI), the line format, ETA."""

import io

from pipeline.console import Console, clock, eta, progress_line

TINY = ["data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.num_classes=3",
        "data.synthetic.image_size=32", "classifier.image_size=32", "classifier.epochs=3",
        "classifier.batch_size=4", "classifier.feature_channels=8", "classifier.backbone_options={width: 4}",
        "classifier.lr_steps=[1]", "classifier.num_workers=0", "classifier.log_every=1",
        "maps.checkpoint_epoch=null", "device=cpu", "threads=1"]


def test_clock_and_eta():
    assert clock(95) == "1:35" and clock(3725) == "1:02:05" and clock(None) == "?"
    assert eta(10, 40, 30.0) == 90.0 and eta(0, 40, 5.0) is None and eta(3, 0, 5.0) is None


def test_progress_line_has_counts_percent_metric_elapsed_and_eta():
    line = progress_line("train_classifier", 12, 40, "epochs", "epoch/loss=0.31", 41.0)
    assert line == "train_classifier 12/40 epochs 30% epoch/loss=0.31 elapsed 0:41 eta 1:36"
    assert progress_line("evaluate", 0, 0, "", "", 3.0) == "evaluate elapsed 0:03"


def test_plain_console_is_throttled_per_stage_and_prints_the_final_line():
    out = io.StringIO()
    console = Console(out, every_s=3600)
    assert not console.live                      # StringIO is not a terminal
    console.started("refine_crf", 10, "images")
    console.update("refine_crf", 1, 10, "images", "", 1.0)
    console.update("refine_crf", 2, 10, "images", "", 2.0)     # throttled
    console.update("generate_cams", 1, 5, "images", "", 1.0)   # another stage: shown
    console.update("refine_crf", 10, 10, "images", "", 9.0, final=True)
    console.finished("refine_crf", "done in 9.0s")
    console.message("disk almost full", "WARNING")
    lines = out.getvalue().splitlines()
    assert lines == ["[wsss] refine_crf: started (10 images)",
                     "[wsss] refine_crf 1/10 images 10% elapsed 0:01 eta 0:09",
                     "[wsss] generate_cams 1/5 images 20% elapsed 0:01 eta 0:04",
                     "[wsss] refine_crf 10/10 images 100% elapsed 0:09 eta 0:00",
                     "[wsss] refine_crf: done in 9.0s",
                     "[wsss] warning: disk almost full"]


def test_live_console_draws_bars_and_prints_single_lines(monkeypatch):
    out = io.StringIO()
    with Console(out, live=True) as console:
        console.started("train_segmentor", 300, "iterations")
        console.update("train_segmentor", 150, 300, "iterations", "loss=0.5", 10.0)
        console.finished("train_segmentor", "done in 20.0s")
    text = out.getvalue()
    assert "train_segmentor: started (300 iterations)" in text and "done in 20.0s" in text


def test_wsss_run_off_a_terminal_prints_stage_progress_lines(tmp_path, capsys):
    """`wsss run` with stdout not a TTY: a start line, per-stage progress lines with counts
    and ETA, the end line, no Prefect event stream; a rerun prints the cache hit."""
    from pipeline.cli import main

    argv = ["run", "--stages", "train_classifier", "--set", f"workdir={tmp_path}",
            "--set", f"data.root={tmp_path / 'data'}"] + [a for o in TINY for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[wsss] train_classifier: started (3 epochs)" in out
    progress = [line for line in out.splitlines() if line.startswith("[wsss] train_classifier ")]
    assert progress and all(" epochs " in line and " eta " in line for line in progress)
    assert "[wsss] train_classifier 3/3 epochs 100% epoch/loss=" in out
    assert "train_classifier: done in" in out and "prefect.artifact" not in out
    assert "stage" in out.splitlines()[-3] and "train_classifier" in out.splitlines()[-2]  # summary table

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "[wsss] train_classifier: cached (key " in again and "started" not in again
