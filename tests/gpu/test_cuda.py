"""CUDA checks, run on a lent GPU machine (skipped here without CUDA).

    .venv/bin/python -m pytest tests/gpu -q

* every stage runs on CUDA with AMP on a tiny config (the five stages end to end);
* stage 2 on CUDA equals stage 2 on the CPU from the same checkpoint, within 2e-2 per map
  value (float16 features, TF32 / cuDNN kernels);
* a classifier step under CUDA autocast keeps the affinity in float32, and its loss equals the
  float32 CPU loss within 2 %;
* 2-process DDP (NCCL) for both training stages when two GPUs are visible;
* benchmarks/gpu.py at the voc settings (5 timed steps) runs and reports a fp16-peak fraction.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.maps_io import load_maps, map_path
from pipeline.tracking import MemoryTracker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (tests/gpu runs on the lent GPU machine)")
ROOT = Path(__file__).resolve().parents[2]


def tiny(root: Path, workdir: Path, device: str, *extra: str):
    return load_config("demo", [
        f"workdir={workdir}", f"data.root={root}", "data.synthetic.num_train=24", "data.synthetic.num_val=8",
        "classifier.epochs=2", "classifier.amp=true", "segmentor.amp=true", "segmentor.iterations=30",
        "segmentor.checkpoint_every=10", f"device={device}", *extra])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def test_five_stages_on_cuda_with_amp(root, tmp_path):
    from stages import run_pipeline
    results = run_pipeline(tiny(root, tmp_path, "cuda"))
    assert list(results) == ["train_classifier", "generate_cams", "refine_crf", "train_segmentor", "evaluate"]
    assert results["evaluate"].metrics["headline"]
    assert np.isfinite(results["train_classifier"].metrics["final_loss"])


def test_stage2_cuda_equals_cpu(root, tmp_path):
    from stages import generate_cams, train_classifier
    config = tiny(root, tmp_path, "cpu", "classifier.epochs=1")
    stage1 = train_classifier.run(config, {}, tmp_path / "cls", MemoryTracker())
    generate_cams.run(config, {"train_classifier": stage1}, tmp_path / "cpu", MemoryTracker())
    cuda = tiny(root, tmp_path, "cuda", "classifier.epochs=1")
    generate_cams.run(cuda, {"train_classifier": stage1}, tmp_path / "cuda", MemoryTracker())
    worst = 0.0
    for path in sorted((tmp_path / "cpu").glob("*.npy")):
        a, b = load_maps(path), load_maps(map_path(tmp_path / "cuda", path.stem))
        if a.maps.size:
            worst = max(worst, float(np.abs(a.maps - b.maps).max()), float(np.abs(a.cams - b.cams).max()))
    assert worst < 2e-2, worst


def test_affinity_fp32_and_step_loss_under_cuda_autocast():
    from models.coattention import CoAttentionClassifier
    from stages.train_classifier import PairTrainer
    torch.manual_seed(0)
    model = CoAttentionClassifier(5, backbone="tiny", feature_channels=64, backbone_options={"width": 16})
    trainer = PairTrainer(model, self_pairs=True)
    g = torch.Generator().manual_seed(1)
    x_m, x_n = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    copies = [torch.randn(2, 3, s, s, generator=g) for s in (64, 48, 128)]
    l_m, l_n = torch.tensor([[1.0, 0, 0, 0, 1], [0, 1, 0, 0, 0]]), torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    with torch.no_grad():
        ref = trainer(x_m, x_n, copies, l_m, l_n, 1.0, 1.0)["loss"]
        trainer.cuda()
        f = model.features(x_m.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            _, _, a_m, a_n = model.co_attention(f.half(), f.half())
            got = trainer(x_m.cuda(), x_n.cuda(), [c.cuda() for c in copies], l_m.cuda(), l_n.cuda(),
                          1.0, 1.0)["loss"]
    assert a_m.dtype == a_n.dtype == torch.float32
    assert abs(float(got) - float(ref)) / float(ref) < 0.02


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="2-process DDP needs two GPUs")
def test_ddp_both_training_stages_two_gpus(root, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({"preset": "demo", "workdir": str(tmp_path), "device": "cuda",
                                  "data": {"root": str(root), "synthetic": {"num_train": 23, "num_val": 8,
                                                                            "class_colours": True}},
                                  "classifier": {"epochs": 1, "batch_size": 4},
                                  "segmentor": {"iterations": 20, "nproc": 2, "batch_size": 4}}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stage1 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "-m", "pipeline.cli", "run", "--config", str(config), "--stages", "train_classifier"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    full = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert full.returncode == 0, full.stderr[-3000:]


def test_gpu_benchmark_at_voc_settings(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py", "--samples", "5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["fp16_peak_fraction"] is None or 0 < r["fp16_peak_fraction"] < 1 for r in rows)
    print(proc.stdout)
