"""Stage 3: dense-CRF refinement (core, presets, ignore rules, stage I/O, resume, parallel)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stages
from pipeline.config import CRFConfig, DataConfig, PipelineConfig, SyntheticConfig, load_config
from pipeline.data import build_dataset
from pipeline.data.palette import read_label_png
from pipeline.maps_io import MapFileError, map_path, save_maps
from pipeline.storage import StageResult, is_complete
from pipeline.tracking import MemoryTracker
from stages import refine_crf
from stages.refine_crf import (CRFInputError, CRFParams, as_rgb, crf_posterior, load_rgb,
                               refine_maps, resolve_params)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


# --------------------------------------------------------------------------- core
def _object_scene(rng, size=64):
    """Two-colour image with a disk object, its mask, and a noisy map of it."""
    yy, xx = np.mgrid[:size, :size]
    obj = (yy - 30) ** 2 + (xx - 34) ** 2 <= 16 ** 2
    image = np.where(obj[..., None], [200, 170, 40], [40, 80, 150]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    noisy = np.clip(0.55 * obj + 0.2 + rng.normal(0, 0.3, obj.shape), 0, 1).astype(np.float32)
    return image, obj, noisy


def test_crf_beats_argmax_of_noisy_unary():
    rng = np.random.default_rng(0)
    image, obj, noisy = _object_scene(rng)
    params = resolve_params(CRFConfig(preset="psa"), alpha_high=None)
    bg = np.power(1 - noisy, params.alpha)
    argmax_fg = noisy > bg                     # argmax of the unary [bg, M]
    crf_fg = refine_maps(image, [3], noisy[None], params) == 3
    assert iou(crf_fg, obj) > iou(argmax_fg, obj) + 0.1
    assert iou(crf_fg, obj) > 0.85


def test_crf_posterior_is_a_distribution_and_checks_shapes():
    rng = np.random.default_rng(1)
    image, obj, noisy = _object_scene(rng, size=32)
    probs = np.stack([1 - noisy, noisy])
    q = crf_posterior(image, probs, resolve_params(CRFConfig(preset="toco")))
    assert q.shape == (2, 32, 32) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-4)
    with pytest.raises(CRFInputError, match="do not fit"):
        crf_posterior(image, probs[:, :16], resolve_params())
    bad = probs.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(CRFInputError, match="NaN"):
        crf_posterior(image, bad, resolve_params())


def test_downscale_runs_at_lower_resolution_and_keeps_the_object():
    rng = np.random.default_rng(2)
    image, obj, noisy = _object_scene(rng)
    params = resolve_params(CRFConfig(preset="psa", downscale=0.5), alpha_high=None)
    label = refine_maps(image, [2], noisy[None], params)
    assert label.shape == obj.shape
    assert iou(label == 2, obj) > 0.8


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, expected", [
    ("psa", dict(unary="scores", background="power", alpha=4.0, alpha_high=32.0, gaussian_sxy=3,
                 gaussian_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10,
                 iterations=10, confidence=None)),
    ("irn", dict(unary="labels", gt_prob=0.7, background="constant", bg_threshold=0.30,
                 bg_low_threshold=0.05, gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50,
                 bilateral_srgb=5, bilateral_compat=10, iterations=10)),
    ("clip_es", dict(unary="scores", background="power", alpha=1.0, gaussian_sxy=1,
                     gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4,
                     confidence=0.95, iterations=10)),
    ("toco", dict(gaussian_sxy=1, gaussian_compat=1, bilateral_sxy=121, bilateral_srgb=5,
                  bilateral_compat=4, iterations=10)),
])
def test_presets_map_to_documented_parameters(name, expected):
    params = resolve_params(CRFConfig(preset=name))
    for field, value in expected.items():
        assert getattr(params, field) == value, field


def test_fields_override_the_preset_one_by_one():
    params = resolve_params(CRFConfig(preset="irn", bilateral_srgb=7.0, iterations=3))
    assert (params.bilateral_srgb, params.iterations) == (7.0, 3)
    assert params.bilateral_sxy == 50 and params.bg_low_threshold == 0.05   # untouched
    cfg = load_config("demo", ["crf.preset=clip_es", "crf.confidence=0.5", "crf.bg_threshold=null",
                               "crf.bg_low_threshold=null"])
    assert resolve_params(cfg.crf).confidence == 0.5


@pytest.mark.parametrize("fields, message", [
    (dict(preset="psa", bg_low_threshold=0.1), "bg_low_threshold applies to background=constant"),
    (dict(preset="irn", alpha_high=8.0), "alpha_high applies to background=power"),
    (dict(preset="psa", alpha=8.0, alpha_high=4.0), "alpha_high .* must be >= crf.alpha"),
    (dict(preset="irn", bg_low_threshold=0.5), "bg_low_threshold .* must be <="),
])
def test_inconsistent_overrides_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        resolve_params(CRFConfig(**fields))


# --------------------------------------------------------------------------- ignore rules
def _no_pairwise(**fields) -> CRFParams:
    """Pairwise weights 0: the posterior is the normalised unary, computable by hand."""
    return CRFParams(gaussian_compat=0.0, bilateral_compat=0.0, **fields)


def test_confidence_threshold_sets_255_where_posterior_is_low():
    image = np.full((8, 10, 3), 100, np.uint8)
    maps = np.zeros((1, 8, 10), np.float32)
    maps[:, :, :5] = 0.9      # Q = [0.1, 0.9] -> confident class 4
    maps[:, :, 5:] = 0.55     # Q = [0.45, 0.55] -> class 4 but below 0.8 -> 255
    params = _no_pairwise(background="power", alpha=1.0, confidence=0.8)
    q = crf_posterior(image, np.stack([1 - maps[0], maps[0]]), params)
    np.testing.assert_allclose(q[1, 0, [0, 9]], [0.9, 0.55], atol=1e-4)
    label = refine_maps(image, [4], maps, params)
    assert (label[:, :5] == 4).all() and (label[:, 5:] == 255).all()
    assert (refine_maps(image, [4], maps, _no_pairwise(background="power", alpha=1.0)) == 4).all()


def test_two_runs_disagreement_is_ignored_irn_style():
    image = np.full((6, 9, 3), 100, np.uint8)
    maps = np.zeros((1, 6, 9), np.float32)
    maps[:, :, :3] = 0.6      # above both thresholds -> class
    maps[:, :, 3:6] = 0.15    # between 0.05 and 0.30 -> the runs disagree -> 255
    maps[:, :, 6:] = 0.01     # below both -> background
    params = _no_pairwise(unary="labels", gt_prob=0.7, background="constant", bg_threshold=0.30,
                          bg_low_threshold=0.05)
    label = refine_maps(image, [7], maps, params)
    assert (label[:, :3] == 7).all() and (label[:, 3:6] == 255).all() and (label[:, 6:] == 0).all()


def test_psa_low_and_high_alpha_runs():
    image = np.full((4, 6, 3), 100, np.uint8)
    maps = np.zeros((1, 4, 6), np.float32)
    maps[:, :, :2] = 0.8      # (0.2)^4 = 0.0016 < 0.8 -> fg in run A
    maps[:, :, 2:4] = 0.3     # (0.7)^4 = 0.24 < 0.3 -> fg in A
    maps[:, :, 4:] = 0.1      # (0.9)^4 = 0.66 > 0.1 -> bg in A; (0.9)^32 = 0.034 < 0.1 -> fg in B -> 255
    params = _no_pairwise(background="power", alpha=4.0, alpha_high=32.0)
    label = refine_maps(image, [1], maps, params)
    assert (label[:, :4] == 1).all() and (label[:, 4:] == 255).all()
    maps[:, :, 4:] = 0.0      # bg in both -> 0
    assert (refine_maps(image, [1], maps, params)[:, 4:] == 0).all()


def test_saliency_cues():
    image = np.full((10, 10, 3), 100, np.uint8)
    maps = np.full((1, 10, 10), 0.9, np.float32)
    saliency = np.zeros((10, 10), np.float32)
    saliency[:, :5] = 1.0     # salient: the map decides -> class
    params = _no_pairwise(background="power", alpha=1.0)
    label = refine_maps(image, [2], maps, params, saliency=saliency)
    assert (label[:, :5] == 2).all() and (label[:, 5:] == 0).all()   # 1 - s = 1 beats 0.9
    saliency[:, 5:] = 0.5
    maps[:, :, 5:] = 0.2      # bg = max(1 - 0.2, 1 - 0.5) = 0.8 wins, but salient (0.5 >= 32/255) -> 255
    label = refine_maps(image, [2], maps, params, saliency=saliency)
    assert (label[:, 5:] == 255).all()
    tiny = np.zeros((1, 10, 10), np.float32)
    tiny[0, 0, 0] = 0.9       # 1 % foreground < min_foreground 5 % -> whole image 255
    label = refine_maps(image, [2], tiny, _no_pairwise(background="power", alpha=1.0,
                                                       min_foreground=0.05), saliency=np.ones((10, 10)))
    assert (label == 255).all()


# --------------------------------------------------------------------------- image channels
def test_image_channels(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert as_rgb(grey).shape == (3, 4, 3) and (as_rgb(grey)[..., 2] == grey).all()
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    assert (load_rgb(tmp_path / "g.png")[..., 1] == grey).all()
    rgba = np.full((3, 4, 4), 200, np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "opaque.png")
    assert load_rgb(tmp_path / "opaque.png").shape == (3, 4, 3)
    rgba[0, 0, 3] = 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    with pytest.raises(CRFInputError, match=r"alpha.png.*transparent"):
        load_rgb(tmp_path / "alpha.png")
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    cmyk = load_rgb(tmp_path / "c.jpg")
    assert cmyk.shape == (3, 4, 3) and cmyk[0, 0, 0] > 200 and cmyk[0, 0, 1] < 50   # red
    Image.fromarray(np.zeros((3, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(CRFInputError, match=r"f.tif has unsupported mode 'F'"):
        load_rgb(tmp_path / "f.tif")
    with pytest.raises(CRFInputError, match="shape"):
        as_rgb(np.zeros((3, 4, 2), np.uint8))


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crf-data") / "synthetic"
    build_dataset(_data_cfg(root), "train")
    return root


def _data_cfg(root: Path) -> DataConfig:
    return DataConfig(dataset="synthetic", root=root, synthetic=SyntheticConfig(
        num_classes=3, num_train=8, num_val=2, image_size=48, seed=3))


def _config(tmp_path: Path, root: Path, **crf) -> PipelineConfig:
    return PipelineConfig(workdir=tmp_path / "work", data=_data_cfg(root), crf=CRFConfig(**crf))


def _write_maps(root: Path, maps_dir: Path, seed: int = 0) -> list[str]:
    """Noisy maps from the ground truth of every train image."""
    dataset = build_dataset(_data_cfg(root), "train")
    rng = np.random.default_rng(seed)
    for image_id in dataset.ids:
        mask = dataset.load_mask(image_id)
        classes = np.flatnonzero(dataset.labels(image_id)) + 1
        maps = [np.clip(0.7 * (mask == c) + rng.normal(0.1, 0.2, mask.shape), 0, 1) for c in classes]
        save_maps(map_path(maps_dir, image_id), classes, np.stack(maps) if maps else np.zeros((0, *mask.shape)))
    return dataset.ids


def _upstream(maps_dir: Path) -> dict:
    return {"generate_cams": StageResult(stage="generate_cams", key="maps0", path=str(maps_dir))}


def _pngs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.png"))}


@pytest.fixture(scope="module")
def maps_dir(synthetic_root, tmp_path_factory):
    directory = tmp_path_factory.mktemp("maps")
    _write_maps(synthetic_root, directory)
    return directory


@pytest.fixture(scope="module")
def serial_output(synthetic_root, maps_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    tracker = MemoryTracker()
    result = refine_crf.run(_config(out, synthetic_root, chunk_size=3), _upstream(maps_dir), out, tracker)
    return out, result, tracker


def test_stage_writes_masks_manifest_and_evaluation(serial_output, synthetic_root):
    out, result, tracker = serial_output
    dataset = build_dataset(_data_cfg(synthetic_root), "train")
    assert sorted(_pngs(out)) == sorted(f"{i}.png" for i in dataset.ids)
    for image_id in dataset.ids:
        label = read_label_png(out / f"{image_id}.png")
        assert label.shape == dataset.load_mask(image_id).shape
        assert set(np.unique(label)) <= {0, 255, *(np.flatnonzero(dataset.labels(image_id)) + 1)}
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P"
    rows = list(csv.DictReader((out / refine_crf.MANIFEST_CSV).open()))
    assert [r["id"] for r in rows] == dataset.ids and {r["status"] for r in rows} == {"refined"}
    first = read_label_png(out / f"{rows[0]['id']}.png")
    assert float(rows[0]["ignore_fraction"]) == pytest.approx(np.mean(first == 255), abs=1e-6)
    evaluation = json.loads((out / refine_crf.EVALUATION_JSON).read_text())
    assert evaluation["miou"] == pytest.approx(result.metrics["miou"])
    assert result.metrics["miou"] > 0.6          # the maps are noisy ground truth
    assert "255 dropped" in result.metrics["headline"]
    assert result.metrics["images"] == len(dataset.ids) and result.metrics["refined"] == len(dataset.ids)
    assert tracker.history("miou") == [result.metrics["miou"]]
    assert tracker.params["crf.resolved.bilateral_sxy"] == 80.0


def test_parallel_output_identical_to_serial(serial_output, synthetic_root, maps_dir, tmp_path):
    out = tmp_path / "parallel"
    refine_crf.run(_config(tmp_path, synthetic_root, workers=2, chunk_size=3), _upstream(maps_dir), out)
    assert _pngs(out) == _pngs(serial_output[0])
    assert (out / refine_crf.MANIFEST_CSV).read_text() == (serial_output[0] / refine_crf.MANIFEST_CSV).read_text()


def test_dask_client_output_identical_to_serial(serial_output, synthetic_root, maps_dir, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        out = tmp_path / "dask"
        refine_crf.run(_config(tmp_path, synthetic_root, chunk_size=2), _upstream(maps_dir), out,
                       client=client)
        by_address = tmp_path / "dask-address"        # crf.dask_address: the stage connects itself
        refine_crf.run(_config(tmp_path, synthetic_root, chunk_size=3,
                               dask_address=cluster.scheduler_address), _upstream(maps_dir), by_address)
    assert _pngs(out) == _pngs(serial_output[0])
    assert _pngs(by_address) == _pngs(serial_output[0])


def test_resume_after_kill_matches_uninterrupted_run(serial_output, synthetic_root, maps_dir, tmp_path,
                                                     monkeypatch):
    config = _config(tmp_path, synthetic_root, chunk_size=3)
    upstream = _upstream(maps_dir)
    key = stages.stage_key(config, "refine_crf", {"generate_cams": "maps0"})
    out = Path(config.workdir) / "refine_crf" / key
    original = refine_crf.refine_file
    calls = []

    def dying(item, params):
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        calls.append(item.id)
        return original(item, params)

    monkeypatch.setattr(refine_crf, "refine_file", dying)
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage("refine_crf", config, upstream)
    assert len(_pngs(out)) == 5 and not is_complete(out)
    (out / ".half.tmp.png").write_bytes(b"\x89PNG half")   # what a kill mid-write leaves
    monkeypatch.setattr(refine_crf, "refine_file", original)
    result = stages.run_stage("refine_crf", config, upstream)
    assert is_complete(out) and not (out / ".half.tmp.png").exists()
    assert _pngs(out) == _pngs(serial_output[0])
    assert result.metrics["resumed"] == 5 and result.metrics["refined"] == 3
    assert result.metrics["miou"] == pytest.approx(serial_output[1].metrics["miou"])


# --------------------------------------------------------------------------- killed parent
# stage 3 with two pool workers in a subprocess; each image takes 60 s, so the stage is
# certainly running when the test kills it; every worker records its pid first
_KILLED_PARENT_SCRIPT = r"""
import os, sys, time
from pathlib import Path

import stages
from pipeline import processes
from pipeline.config import CRFConfig, DataConfig, PipelineConfig, SyntheticConfig
from pipeline.storage import StageResult
from stages import refine_crf

root, maps, work, pids, mode = sys.argv[1:]
if mode == "watchdog":                  # the portable fallback alone
    processes.set_parent_death_signal = lambda *args: False
original = refine_crf.refine_file

def slow(item, params):
    Path(pids, str(os.getpid())).touch()
    time.sleep(60)
    return original(item, params)

refine_crf.refine_file = slow
data = DataConfig(dataset="synthetic", root=root, synthetic=SyntheticConfig(
    num_classes=3, num_train=8, num_val=2, image_size=48, seed=3))
config = PipelineConfig(workdir=work, data=data, crf=CRFConfig(workers=2, chunk_size=1))
upstream = {"generate_cams": StageResult(stage="generate_cams", key="maps0", path=maps)}
stages.run_stage("refine_crf", config, upstream)
"""


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_workers_die_with_a_killed_parent(synthetic_root, maps_dir, tmp_path, mode):
    """kill -9 of the process running stage 3 (crf.workers=2): no worker outlives it, with
    the parent-death signal and with the watchdog thread alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT_SCRIPT, str(synthetic_root),
                               str(maps_dir), str(tmp_path / "work"), str(pids), mode])
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 25
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "the two workers did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent"
    finally:
        parent.kill()
        for pid in workers:          # never leave orphans behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def own_maps(synthetic_root, tmp_path):
    directory = tmp_path / "maps"
    ids = _write_maps(synthetic_root, directory, seed=1)
    return directory, ids


def test_missing_map_file_is_named_or_skipped(own_maps, synthetic_root, tmp_path):
    directory, ids = own_maps
    map_path(directory, ids[2]).unlink()
    with pytest.raises(CRFInputError, match=f"{ids[2]}.npy"):
        refine_crf.run(_config(tmp_path, synthetic_root), _upstream(directory), tmp_path / "a")
    assert not list((tmp_path / "a").glob("*.png"))          # failed before any work
    result = refine_crf.run(_config(tmp_path, synthetic_root, skip_missing=True), _upstream(directory),
                            tmp_path / "b")
    assert result.metrics["skipped_missing"] == 1 and result.metrics["images"] == len(ids) - 1
    assert not (tmp_path / "b" / f"{ids[2]}.png").exists()
    assert "1 image(s) skipped" in result.metrics["headline"]


def test_map_image_size_mismatch_names_both_sizes(own_maps, synthetic_root, tmp_path):
    directory, ids = own_maps
    save_maps(map_path(directory, ids[1]), [1], np.zeros((1, 40, 30)))
    with pytest.raises(CRFInputError, match=r"30x40 but image .*48x48"):
        refine_crf.run(_config(tmp_path, synthetic_root), _upstream(directory), tmp_path / "a")


@pytest.mark.parametrize("workers", [1, 2])
def test_non_finite_map_names_file_and_class(own_maps, synthetic_root, tmp_path, workers):
    directory, ids = own_maps
    maps = np.full((2, 48, 48), 0.5)
    maps[1, 3, 3] = np.inf
    save_maps(map_path(directory, ids[4]), [1, 3], maps)
    with pytest.raises(MapFileError, match=rf"{ids[4]}.npy.*class 3 holds NaN/inf"):
        refine_crf.run(_config(tmp_path, synthetic_root, workers=workers, chunk_size=2),
                       _upstream(directory), tmp_path / "a")
    assert not (tmp_path / "a" / f"{ids[4]}.png").exists()


def test_class_outside_dataset_is_rejected(own_maps, synthetic_root, tmp_path):
    directory, ids = own_maps
    save_maps(map_path(directory, ids[0]), [9], np.zeros((1, 48, 48)))
    with pytest.raises(CRFInputError, match=rf"{ids[0]}.npy holds class ids \[9\] outside 1..3"):
        refine_crf.run(_config(tmp_path, synthetic_root), _upstream(directory), tmp_path / "a")


def test_missing_saliency_map_is_named(own_maps, synthetic_root, tmp_path):
    directory, ids = own_maps
    with pytest.raises(CRFInputError, match=rf"saliency map .*{ids[0]}.png"):
        refine_crf.run(_config(tmp_path, synthetic_root, saliency_dir=tmp_path / "sal"),
                       _upstream(directory), tmp_path / "a")


def test_cli_skip_missing_flag_sets_the_field(monkeypatch, tmp_path):
    from pipeline.cli import main as cli_main
    seen = []
    monkeypatch.setattr(stages, "run_pipeline", lambda config, **kw: seen.append(config) or {})
    monkeypatch.setattr(stages, "check_run_inputs", lambda *args, **kw: [])
    assert cli_main(["run", "--stages", "refine_crf", "--skip-missing", "--set", f"workdir={tmp_path}"]) == 0
    assert seen[0].crf.skip_missing is True
    assert cli_main(["run", "--stages", "refine_crf", "--set", f"workdir={tmp_path}"]) == 0
    assert seen[1].crf.skip_missing is False


def test_stage_converts_grey_images_and_refuses_unusable_modes_up_front(own_maps, synthetic_root, tmp_path):
    import shutil
    directory, ids = own_maps
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    dataset = build_dataset(_data_cfg(root), "train")
    grey_path, bad_path = dataset.image_path(ids[5]), dataset.image_path(ids[3])
    with Image.open(grey_path) as image:
        image.convert("L").save(grey_path, format="JPEG")
    Image.fromarray(np.zeros((48, 48), np.uint16)).save(bad_path, format="PNG")   # 16-bit grey
    with pytest.raises(CRFInputError, match=rf"{bad_path.name} has unsupported mode 'I;16'"):
        refine_crf.run(_config(tmp_path, root), _upstream(directory), tmp_path / "a")
    assert not list((tmp_path / "a").glob("*.png"))          # refused before any CRF work
    with Image.open(grey_path) as image:
        image.convert("RGB").save(bad_path, format="JPEG")
    result = refine_crf.run(_config(tmp_path, root), _upstream(directory), tmp_path / "b")
    assert result.metrics["refined"] == len(ids) and (tmp_path / "b" / f"{ids[5]}.png").is_file()


def test_source_cams_refines_the_plain_cams_of_the_file(tmp_path):
    """crf.source picks which maps of a stage-2 file are refined: an object present only in
    the CAMs appears in the pseudo-mask with source=cams and not with source=maps."""
    rng = np.random.default_rng(0)
    image, truth, _ = _object_scene(rng)
    image_path = tmp_path / "image.png"
    Image.fromarray(image).save(image_path)
    cam = truth.astype(np.float32)[None]
    maps_file = map_path(tmp_path, "x")
    save_maps(maps_file, [1], np.zeros_like(cam), cams=cam)
    labels = {}
    for source in ("maps", "cams"):
        params = resolve_params(CRFConfig(preset="irn", source=source))
        out = tmp_path / f"{source}.png"
        refine_crf.refine_file(refine_crf.WorkItem("x", str(image_path), str(maps_file), str(out)), params)
        labels[source] = read_label_png(out)
    assert not np.any(labels["maps"] == 1)
    assert np.mean(labels["cams"][truth] == 1) > 0.9


@pytest.mark.timeout(180)
def test_forked_workers_upsample_low_resolution_maps_after_the_parent_used_threads(tmp_path):
    """Regression (voc-mini hang): maps stored at feature resolution are upsampled with torch in
    the forked workers; after the parent ran a multi-threaded torch op (stages 1-2 in the same
    process), a worker's multi-threaded op waited forever. Workers now run torch on one thread."""
    import torch
    import torch.nn.functional as F

    root = tmp_path / "big"
    cfg = DataConfig(dataset="synthetic", root=root, synthetic=SyntheticConfig(
        num_classes=2, num_train=4, num_val=1, image_size=256, seed=5))
    dataset = build_dataset(cfg, "train")
    maps_dir = tmp_path / "maps"
    rng = np.random.default_rng(0)
    for image_id in dataset.ids:
        classes = np.flatnonzero(dataset.labels(image_id)) + 1
        low = rng.uniform(0, 1, (len(classes), 16, 16))
        save_maps(map_path(maps_dir, image_id), classes, low, size=(256, 256))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        F.interpolate(torch.rand(1, 8, 32, 32), size=(512, 512), mode="bicubic")   # the parent's pool runs
        config = PipelineConfig(workdir=tmp_path / "work", data=cfg, crf=CRFConfig(workers=2, chunk_size=2))
        result = refine_crf.run(config, _upstream(maps_dir), tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    assert result.metrics["refined"] == 4 and len(_pngs(tmp_path / "out")) == 4
