"""``wsss predict``: equal to stage 5's predictions on a tiny demo run, any image mode and EXIF
orientation, bad files skipped, reruns skip what exists, model specs resolved."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.palette import read_label_png

TINY = [
    "data.synthetic.num_train=12", "data.synthetic.num_val=6", "data.synthetic.image_size=48",
    "classifier.epochs=2", "classifier.image_size=48", "classifier.lr_steps=[2]",
    "classifier.contrastive_from_epoch=0", "maps.workers=1", "crf.workers=1",
    "crf.source=cams", "crf.bg_threshold=0.3", "crf.bg_low_threshold=0.3",   # foreground pseudo-masks
    "segmentor.iterations=40", "segmentor.crop_size=48", "segmentor.checkpoint_every=40",
    "segmentor.warmup_iters=2", "segmentor.log_every=10", "segmentor.models=[fcn, sanet]",
    "segmentor.model_options={fcn: {channels: 16, aux_channels: 8}}",
    "evaluation.crop_size=48", "evaluation.previews=0", "evaluation.scales=[0.75, 1.0]",
    "evaluation.flip=true",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny demo pipeline run (all five stages): (config, results)."""
    import torch

    import stages

    base = tmp_path_factory.mktemp("predict")
    config = load_config("demo", [f"workdir={base / 'work'}", f"data.root={base / 'data'}", *TINY])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = stages.run_pipeline(config)
    finally:
        torch.set_num_threads(threads)
    return config, results


def test_equals_stage_5_predictions(demo_run, tmp_path):
    config, results = demo_run
    seg_dir = Path(results["train_segmentor"].path)
    images = sorted((Path(config.data.root) / "JPEGImages").glob("val_*.jpg"))
    foreground = {}
    for name in ("fcn", "sanet"):
        out = tmp_path / name
        rc = main(["predict", "--model", str(seg_dir), "--segmentor", name, "--input", *map(str, images),
                   "--out", str(out), "--scales", "0.75,1.0", "--flip", "--batch-size", "4", "--threads", "1"])
        assert rc == 0
        stage5 = Path(results["evaluate"].path) / name / "predictions"
        preds = [read_label_png(out / f"{p.stem}.png") for p in images]
        foreground[name] = any((pred > 0).any() for pred in preds)
        for image, pred in zip(images, preds):
            assert np.array_equal(pred, read_label_png(stage5 / f"{image.stem}.png")), image.name
    # the 40-iteration tiny FCN may stay at all-background; SANet does not: at least one is non-trivial
    assert any(foreground.values()), "a trivial all-background model proves little"


def test_modes_exif_bad_files_and_rerun(demo_run, tmp_path, capsys):
    config, results = demo_run
    model = str(Path(results["train_segmentor"].path) / "fcn" / "model.pt")
    photo = Image.open(next((Path(config.data.root) / "JPEGImages").glob("val_*.jpg"))).convert("RGB")
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    photo.convert("L").save(inputs / "grey.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(inputs / "alpha.png")
    photo.convert("CMYK").save(inputs / "cmyk.jpg")
    Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 256)).save(inputs / "deep.png")
    wide = photo.resize((72, 40))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees clockwise on display
    wide.save(inputs / "nested" / "rotated.jpg", exif=exif)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    args = ["predict", "--model", model, "--input", str(inputs), "--out", str(out), "--overlay",
            "--threads", "1"]
    assert main(args) == 1                              # one file skipped
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err
    for name in ("grey", "alpha", "cmyk", "deep"):
        assert read_label_png(out / f"{name}.png").shape == (48, 48)
        assert (out / f"{name}.overlay.jpg").is_file()
    assert read_label_png(out / "nested" / "rotated.png").shape == (72, 40)   # EXIF applied: 40 wide
    assert not (out / "broken.png").exists() and not list(out.rglob(".*tmp*"))

    stamp = (out / "grey.png").stat().st_mtime_ns
    (out / "cmyk.png").unlink()
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "1 written, 4 already there, 1 unreadable" in printed
    assert (out / "grey.png").stat().st_mtime_ns == stamp and (out / "cmyk.png").is_file()


def test_model_specs(demo_run, tmp_path, capsys):
    from stages.predict import ModelSpecError, checkpoint_in

    config, results = demo_run
    seg_dir = Path(results["train_segmentor"].path)
    assert checkpoint_in(Path(config.workdir), "sanet") == seg_dir / "sanet" / "model.pt"
    assert checkpoint_in(seg_dir / "fcn") == seg_dir / "fcn" / "model.pt"
    with pytest.raises(ModelSpecError, match="several segmentors .*fcn, sanet.*--segmentor"):
        checkpoint_in(seg_dir)
    assert main(["predict", "--model", str(tmp_path / "none"), "--input", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a file, a directory, an MLflow run id" in capsys.readouterr().err
