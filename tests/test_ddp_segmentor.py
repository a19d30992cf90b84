"""Stage 4 under torchrun: two gloo CPU processes train a tiny segmentor with DDP."""

import json
import shutil

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import build_dataset
from pipeline.runtime import load_checkpoint
from pipeline.storage import StageResult
from pipeline.tracking import MemoryTracker
from stages import train_segmentor as ts

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def test_ddp_two_cpu_processes(tmp_path):
    config = load_config("demo")
    data = {**config.data.model_dump(), "root": str(tmp_path / "data"),
            "synthetic": {"num_train": 8, "num_val": 4, "image_size": 32}}
    seg = {**config.segmentor.model_dump(), "models": ["fcn"], "iterations": 4, "batch_size": 4,
           "crop_size": 32, "checkpoint_every": 2, "log_every": 1, "nproc": 2, "num_workers": 0,
           "model_options": {"fcn": {"channels": 8, "aux_channels": 8, "backbone_options": {"width": 8}}}}
    config = config.model_validate({**config.model_dump(), "device": "cpu", "data": data, "segmentor": seg})
    dataset = build_dataset(config.data, "train")
    masks = tmp_path / "masks"
    masks.mkdir()
    for image_id in dataset.ids:
        shutil.copy(dataset.mask_path(image_id), masks / f"{image_id}.png")

    tracker = MemoryTracker()
    result = ts.run(config, {"refine_crf": StageResult("refine_crf", "k", str(masks))}, tmp_path / "out",
                    tracker)
    out = tmp_path / "out" / "fcn"
    summary = json.loads((out / ts.RESULT_FILE).read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 4
    log = (out / "train.log").read_text()
    assert "Traceback" not in log
    # losses are all-reduced means over the two ranks, logged once (by rank 0)
    losses = tracker.children["fcn"].history("loss")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    state = load_checkpoint(out / ts.CHECKPOINT)
    assert state["iteration"] == 4 and state["num_classes"] == dataset.num_classes
    assert not any(k.startswith("module.") for k in state["model"])
    assert isinstance(result.metrics["fcn_loss"], float)

    # DDP trained the same network a single process builds: the weights load and predict
    model, _ = ts.load_trained(out / ts.MODEL_FILE, dataset.num_classes)
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 32, 32))["out"]
    assert logits.shape[:2] == (1, dataset.num_classes)
