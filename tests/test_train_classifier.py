"""Stage 1 on a very small synthetic dataset with the tiny backbone."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.tracking import MemoryTracker
from stages import train_classifier
from stages.train_classifier import (CheckpointError, checkpoint_path, list_checkpoints,
                                     load_classifier)


def small_config(root: Path, num_train: int = 16, **classifier):
    overrides = [f"data.root={root}", f"data.synthetic.num_train={num_train}", "data.synthetic.num_val=4",
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
    config = small_config(data_root, epochs=6, lr_steps="[10]", self_pairs="false", lr=0.03,
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
        train_classifier.run(small_config(Path(root), 15, epochs=1), {}, Path(out), tracker)
        # after training, this rank's weights (rank 0's are in the checkpoint)
        resume = torch.load(Path(out) / "resume.pt", weights_only=False) if rank == 0 else None
        runtime.barrier()
        model_state = torch.load(checkpoint_path(Path(out), 1), weights_only=False)["model"]
        torch.save({"steps": len(tracker.history("step/loss")), "model": model_state,
                    "has_resume": resume is not None}, Path(out) / f"rank{rank}.pt")
    finally:
        runtime.cleanup_distributed()


def test_shard_pairs_gives_every_rank_the_same_count():
    pairs = [(i, i + 100) for i in range(7)]
    shards = [train_classifier.shard_pairs(pairs, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    assert sorted(shards[0] + shards[1]) == sorted(pairs + pairs[:1])    # padded with the first
    assert [len(train_classifier.shard_pairs(pairs[:1], r, 3)) for r in range(3)] == [1, 1, 1]
    assert train_classifier.shard_pairs(pairs, 0, 1) == pairs


def test_ddp_two_cpu_processes_odd_pair_count(tmp_path):
    """15 pairs over 2 ranks (padded to 16): both ranks take 8 pairs, 2 per step (batch_size 4
    is the total), 4 steps each, so the last all-reduce is matched and the run finishes."""
    from pipeline.data import build_dataset
    root = tmp_path / "data15"
    build_dataset(small_config(root, 15).data, "train")      # generate once, before spawning
    out = tmp_path / "out"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=True)
    assert sorted(list_checkpoints(out)) == [1]
    rank0 = torch.load(out / "rank0.pt", weights_only=False)
    rank1 = torch.load(out / "rank1.pt", weights_only=False)
    assert rank0["steps"] == 4 and rank1["steps"] == 0          # only rank 0 logs
    assert "epoch/loss" in (out / "history.json").read_text()


# ------------------------------------------------------------------ official recipe points
class _OneImage:
    """A dataset of one untransformed uint8 image (what stage 1 now reads)."""

    def __init__(self, image):
        self.image = image

    def __getitem__(self, index):
        from torchvision import tv_tensors
        return {"image": tv_tensors.Image(self.image), "labels": torch.tensor([1.0, 0.0])}


def test_self_pair_copies_come_from_the_original_image_without_jitter():
    """Official loader: tsfm_more = [Resize(256) + flip, Resize(192), Resize(512)] applied to
    the original image, no ColorJitter; the main views are Resize(256) + ColorJitter."""
    from PIL import Image
    assert train_classifier.self_pair_views(256) == [(256, True), (192, False), (512, False)]
    image = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    config = small_config(Path("unused"), image_size=40, colour_jitter="[0.3, 0.3, 0.3, 0.1]")
    pairs = train_classifier.PairDataset(_OneImage(image), [(0, 0)],
                                         train_classifier.training_transform(config.classifier),
                                         train_classifier.self_pair_views(40))
    torch.manual_seed(1)
    view_m, view_n, copies, _, _ = pairs[0]
    assert view_m.shape == (3, 40, 40) and [tuple(c.shape) for c in copies] == [(3, 40, 40), (3, 30, 30),
                                                                                 (3, 80, 80)]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    for copy, (side, flip) in zip(copies, [(40, True), (30, False), (80, False)]):
        ref = np.asarray(pil.resize((side, side), Image.BILINEAR), dtype=np.int16)
        ref = ref[:, ::-1] if flip else ref
        assert np.abs(copy.permute(1, 2, 0).numpy().astype(np.int16) - ref).max() <= 2   # no jitter
    plain = np.asarray(pil.resize((40, 40), Image.BILINEAR), dtype=np.int16)
    assert np.abs(view_m.permute(1, 2, 0).numpy().astype(np.int16) - plain).max() > 10    # jittered


def test_no_random_flip_by_default():
    """The official training views are never flipped at random; flip=True is the opt-in."""
    from torchvision.transforms import v2
    default = load_config(None).classifier
    assert default.flip is False
    assert not any(isinstance(t, v2.RandomHorizontalFlip)
                   for t in train_classifier.training_transform(default).transforms)
    flipped = default.model_copy(update={"flip": True})
    assert any(isinstance(t, v2.RandomHorizontalFlip)
               for t in train_classifier.training_transform(flipped).transforms)


def test_checkpoint_epoch_matches_the_official_file():
    """train.py saves 'pascal_voc_epoch_%d.pth' % current_epoch after training epoch
    current_epoch (0-based); test.sh loads epoch_10, so 11 epochs of training."""
    official_saves = {}
    epochs_trained = 0
    for current_epoch in range(15):            # the official loop, counting epochs trained
        epochs_trained += 1
        official_saves[f"pascal_voc_epoch_{current_epoch}.pth"] = epochs_trained
    voc = load_config("voc")
    assert voc.maps.checkpoint_epoch == official_saves["pascal_voc_epoch_10.pth"] == 11
    assert checkpoint_path(Path("out"), voc.maps.checkpoint_epoch).name == "epoch_011.pt"


def test_per_side_contrastive_weights_in_a_step():
    """PairTrainer adds L_con(m) only with w_con_m and L_con(n) only with w_con_n."""
    torch.manual_seed(0)
    model = train_classifier.CoAttentionClassifier(3, backbone="tiny", feature_channels=8,
                                                   backbone_options={"width": 4})
    trainer = train_classifier.PairTrainer(model, self_pairs=False)
    x_m, x_n = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    l_m, l_n = torch.tensor([[1.0, 1, 0], [1, 0, 0]]), torch.tensor([[1.0, 0, 1], [1, 0, 0]])
    from models.coattention import mcis_losses
    with torch.no_grad():
        out = model(x_m, x_n)
        ref = mcis_losses(out, l_m, l_n)
        for w_m, w_n in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
            terms = trainer(x_m, x_n, [], l_m, l_n, w_m, w_n)
            assert torch.isclose(terms["con_co_att"], w_m * ref["con_m"] + w_n * ref["con_n"], atol=1e-5)
            assert torch.isclose(terms["basic"], ref["basic"], atol=1e-5)


def test_wsss_run_under_torchrun_two_cpu_processes(tmp_path):
    """The user's DDP path: `torchrun --nproc_per_node=2 -m pipeline.cli run --stages
    train_classifier` (gloo on CPU). Both ranks enter the stage (only rank 0 takes the stage
    lock and writes the completion marker), so neither waits for the other forever."""
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    config = tmp_path / "ddp.yaml"
    config.write_text("\n".join([
        "preset: demo", f"workdir: {tmp_path / 'work'}", "device: cpu",
        "data: {root: %s, synthetic: {num_train: 15, num_val: 4, num_classes: 3, image_size: 48}}"
        % (tmp_path / "data"),
        "classifier: {epochs: 1, batch_size: 4, image_size: 48, feature_channels: 16, "
        "backbone_options: {width: 8}, num_workers: 0}"]))
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "pipeline.cli", "run", "--config",
                           str(config), "--stages", "train_classifier"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = list((tmp_path / "work" / "train_classifier").glob("*/COMPLETE"))
    assert len(done) == 1
    assert sorted(list_checkpoints(done[0].parent)) == [1]


def test_cam_baseline_trains_single_images_with_l_basic_only(data_root, tmp_path):
    config = small_config(data_root, epochs=2, method="cam", freeze_backbone="true")
    tracker = MemoryTracker()
    train_classifier.run(config, {}, tmp_path, tracker)
    assert len(tracker.history("step/loss")) == 2 * 4          # 16 images / 4 per step
    assert tracker.history("step/loss") == tracker.history("step/basic")
    trained = final_weights(tmp_path, 2)
    # co-attention layers and the frozen backbone never move; the CAM head does
    first = torch.load(checkpoint_path(tmp_path, 1), weights_only=False)["model"]
    for key in ("w_p.weight", "class_conv.weight", "w_b.weight"):
        assert torch.equal(first[key], trained[key]), key
    assert all(torch.equal(first[k], trained[k]) for k in trained if k.startswith("backbone.")
               and "num_batches" not in k)
    assert not torch.equal(first["cam_head.weight"], trained["cam_head.weight"])
    _, meta = load_classifier(checkpoint_path(tmp_path, 2))
    assert meta["method"] == "cam"


@pytest.mark.parametrize("method", ["mcis", "cam"])
def test_cached_backbone_features_train_the_same_weights(data_root, tmp_path, method):
    """classifier.cache_features: the frozen backbone's features computed once give the same
    losses and weights as running the frozen backbone in every step (self-pair copies too)."""
    common = dict(epochs=2, method=method, freeze_backbone="true", flip="false", self_pairs="true",
                  contrastive_from_epoch=0)
    plain_tracker, cached_tracker = MemoryTracker(), MemoryTracker()
    train_classifier.run(small_config(data_root, **common), {}, tmp_path / "plain", plain_tracker)
    train_classifier.run(small_config(data_root, cache_features="true", **common), {},
                         tmp_path / "cached", cached_tracker)
    plain, cached = final_weights(tmp_path / "plain", 2), final_weights(tmp_path / "cached", 2)
    assert plain.keys() == cached.keys()
    for key in plain:
        assert torch.allclose(plain[key].float(), cached[key].float(), atol=1e-4), key
    assert not torch.equal(plain["cam_head.weight"],
                           torch.load(checkpoint_path(tmp_path / "plain", 1), weights_only=False)["model"]
                           ["cam_head.weight"])
    np.testing.assert_allclose(cached_tracker.history("step/loss"), plain_tracker.history("step/loss"),
                               rtol=1e-4)
    if method == "mcis":     # the copies' terms are there
        assert cached_tracker.history("step/self_co_att")[0] > 0


def test_cached_features_are_refused_when_views_are_random_or_over_budget(data_root, tmp_path):
    from pipeline.config import ConfigError
    from stages.classifier_features import FeatureCacheError

    with pytest.raises(ConfigError, match="freeze_backbone"):
        small_config(data_root, cache_features="true", flip="false")
    with pytest.raises(ConfigError, match="flip=false"):
        small_config(data_root, cache_features="true", freeze_backbone="true", flip="true")
    config = small_config(data_root, cache_features="true", freeze_backbone="true", flip="false",
                          feature_cache_mb=1, image_size=256)
    with pytest.raises(FeatureCacheError, match="feature_cache_mb=1"):
        train_classifier.run(config, {}, tmp_path, MemoryTracker())
    assert not (tmp_path / "checkpoints").exists()
