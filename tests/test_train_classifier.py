"""Stage 1 on a very small synthetic dataset with the tiny backbone."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.tracking import MemoryTracker
from stages import train_classifier
from stages.train_classifier import (CheckpointError, checkpoint_path, list_checkpoints,
                                     load_classifier)


def small_config(root: Path, **classifier):
    overrides = [f"data.root={root}", "data.synthetic.num_train=16", "data.synthetic.num_val=4",
                 "data.synthetic.class_colours=false",
                 "data.synthetic.num_classes=3", "data.synthetic.image_size=48",
                 "classifier.image_size=48", "classifier.epochs=2", "classifier.batch_size=4",
                 "classifier.feature_channels=16", "classifier.backbone_options={width: 8}",
                 "classifier.lr=0.01", "classifier.lr_steps=[1]", "classifier.contrastive_from_epoch=1",
                 "classifier.optimizer=sgd", "classifier.new_layer_lr_mult=10",
                 "classifier.weight_decay=5e-4",
                 "classifier.log_every=1", "classifier.num_workers=0", "device=cpu"]
    overrides += [f"classifier.{k}={v}" for k, v in classifier.items()]
    return load_config("demo", overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def final_weights(out_dir: Path, epoch: int):
    return torch.load(checkpoint_path(out_dir, epoch), weights_only=False)["model"]


def test_training_writes_checkpoints_and_logs(data_root, tmp_path):
    config = small_config(data_root)
    tracker = MemoryTracker()
    result = train_classifier.run(config, {}, tmp_path, tracker)
    assert sorted(list_checkpoints(tmp_path)) == [1, 2]
    assert (tmp_path / "resume.pt").is_file() and (tmp_path / "history.json").is_file()
    assert len(tracker.history("epoch/loss")) == 2
    assert len(tracker.history("step/loss")) == 2 * 4          # 16 pairs / 4 per step, every step
    # contrastive term joins at epoch index 1 only
    assert tracker.history("epoch/con_co_att")[0] == 0.0
    assert result.metrics["num_images"] == 16 and result.files["checkpoint"].endswith("epoch_002.pt")
    lrs = tracker.history("epoch/lr")
    assert lrs[0] == pytest.approx(0.001) and lrs[1] == pytest.approx(0.001)   # step at epoch 1
    model, meta = load_classifier(checkpoint_path(tmp_path, 2), backbone="tiny", num_classes=3)
    assert meta["class_names"][0] == "background" and model.num_classes == 3


def test_loss_decreases(data_root, tmp_path):
    config = small_config(data_root, epochs=6, lr_steps="[10]", self_pairs="false",
                          contrastive_from_epoch=10, colour_jitter="[0, 0, 0, 0]", flip="false")
    tracker = MemoryTracker()
    train_classifier.run(config, {}, tmp_path, tracker)
    losses = tracker.history("epoch/loss")
    assert losses[-1] < 0.85 * losses[0], losses


def test_adamw_new_layer_mult_and_scaled_affinity_round_trip(data_root, tmp_path):
    config = small_config(data_root, epochs=1, optimizer="adamw", lr=0.002, new_layer_lr_mult=1,
                          scale_affinity="true", weight_decay=1e-4)
    model = train_classifier.CoAttentionClassifier(3, backbone="tiny", feature_channels=16,
                                                   backbone_options={"width": 8})
    optimizer = train_classifier.build_optimizer(model, config.classifier)
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["new_w"] == pytest.approx(0.002) and lrs["new_b"] == pytest.approx(0.004)
    assert isinstance(train_classifier.build_optimizer(
        model, small_config(data_root).classifier), torch.optim.SGD)
    train_classifier.run(config, {}, tmp_path, MemoryTracker())
    loaded, meta = load_classifier(checkpoint_path(tmp_path, 1), backbone="tiny", num_classes=3)
    assert meta["scale_affinity"] is True and loaded.scale_affinity


class KilledAfterEpoch(MemoryTracker):
    """Raises when epoch metrics are logged (after the checkpoint is written): a kill."""

    def log_metrics(self, metrics, step=None):
        if "epoch/loss" in metrics and step == 1:
            raise KeyboardInterrupt("killed")
        super().log_metrics(metrics, step)


def test_resume_after_kill_gives_same_weights(data_root, tmp_path):
    config = small_config(data_root, epochs=3)
    train_classifier.run(config, {}, tmp_path / "straight", MemoryTracker())
    with pytest.raises(KeyboardInterrupt):
        train_classifier.run(config, {}, tmp_path / "killed", KilledAfterEpoch())
    assert sorted(list_checkpoints(tmp_path / "killed")) == [1]
    tracker = MemoryTracker()
    train_classifier.run(config, {}, tmp_path / "killed", tracker)
    assert [s for s, m in tracker.metrics if "epoch/loss" in m] == [2, 3]   # resumed at epoch 2
    a, b = final_weights(tmp_path / "straight", 3), final_weights(tmp_path / "killed", 3)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_of_other_architecture_or_classes(data_root, tmp_path):
    config = small_config(data_root, epochs=1)
    train_classifier.run(config, {}, tmp_path, MemoryTracker())
    path = checkpoint_path(tmp_path, 1)
    with pytest.raises(CheckpointError, match="backbone 'tiny'.*'resnet50' is expected"):
        load_classifier(path, backbone="resnet50")
    with pytest.raises(CheckpointError, match="3 classes.*20 foreground"):
        load_classifier(path, num_classes=20)
    # resuming with another architecture in the same directory is refused too
    other = small_config(data_root, epochs=2, feature_channels=8)
    with pytest.raises(CheckpointError, match="16 feature channels.*8 are expected"):
        train_classifier.run(other, {}, tmp_path, MemoryTracker())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pipeline import runtime
    tracker = MemoryTracker()
    try:
        train_classifier.run(small_config(Path(root), epochs=1), {}, Path(out), tracker)
        # after training, this rank's weights (rank 0's are in the checkpoint)
        resume = torch.load(Path(out) / "resume.pt", weights_only=False) if rank == 0 else None
        runtime.barrier()
        model_state = torch.load(checkpoint_path(Path(out), 1), weights_only=False)["model"]
        torch.save({"steps": len(tracker.history("step/loss")), "model": model_state,
                    "has_resume": resume is not None}, Path(out) / f"rank{rank}.pt")
    finally:
        runtime.cleanup_distributed()


def test_ddp_two_cpu_processes(data_root, tmp_path):
    from pipeline.data import build_dataset
    build_dataset(small_config(data_root).data, "train")      # generate once, before spawning
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data_root), str(tmp_path)), nprocs=2, join=True)
    assert sorted(list_checkpoints(tmp_path)) == [1]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # each rank took half of the 16 pairs: 8 / 4 per step = 2 steps; only rank 0 logs
    assert rank0["steps"] == 2 and rank1["steps"] == 0
    assert "epoch/loss" in (tmp_path / "history.json").read_text()
