"""Configuration of the whole pipeline: one pydantic model per stage plus the pipeline.

Every model forbids unknown keys and validates types and ranges, so a typo in a YAML file
or a ``--set crf.iterations=five`` override fails before any work starts, with the full
dotted field path in the message (``crf.iterations: Input should be a valid integer``).

Presets:
* ``voc``  — PASCAL VOC 2012 + SBD (train_aug), the paper settings (MCIS classifier recipe,
  PSA-style CRF, segmentors with the mmseg VOC12aug recipe).
* ``coco`` — MS COCO 2014 (80 classes), same method settings.
* ``demo`` — the embedded synthetic dataset, sized so the five stages run on 2 CPU cores
  in minutes.

Load with :func:`load_config` (a preset name or a YAML/JSON file, plus dotted overrides).
"""

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("voc", "coco", "demo", "voc-mini")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field path."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class SyntheticConfig(StrictModel):
    """The synthetic dataset generator (VOC layout, written under ``data.root``)."""

    num_classes: int = Field(5, ge=1, le=20, description="foreground classes K")
    num_train: int = Field(160, ge=1)
    num_val: int = Field(48, ge=1)
    image_size: int = Field(96, ge=32, le=1024, description="square image side in pixels")
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1)
    class_colours: bool = Field(False, description=(
        "colour cue: each class paints with its own hue, the background is greyish (see "
        "pipeline.data.synthetic); makes the classes learnable from scratch in minutes"))
    seed: int = 0

    @model_validator(mode="after")
    def _objects_range(self):
        if self.max_objects < self.min_objects:
            raise ValueError(f"max_objects ({self.max_objects}) < min_objects ({self.min_objects})")
        return self


class DataConfig(StrictModel):
    """Which dataset, where it lives, which splits."""

    dataset: Literal["synthetic", "voc", "coco", "folder"] = "synthetic"
    root: Path = Field(Path("work/data/synthetic"), description=(
        "synthetic: output directory of the generator (VOC layout); voc: the VOC2012 "
        "directory of a VOCdevkit (JPEGImages, SegmentationClass, ImageSets); coco: the COCO "
        "root holding annotations/ and train2017/ (or train2014/); folder: the directory holding "
        "images/, the labels file and optionally masks/ (pipeline.data.folder)."))
    train_split: str = Field("train", min_length=1, description="split for stages 1-4 (VOC+SBD: train_aug)")
    val_split: str = Field("val", min_length=1, description="split the segmentors are scored on")
    label_source: Literal["masks", "cls_labels", "xml"] = Field(
        "masks", description="where VOC image-level labels come from")
    labels_file: Optional[Path] = Field(None, description=(
        "label_source=cls_labels: the pickled dict id -> label vector (default <root>/cls_labels.npy); "
        "folder: the labels CSV / JSON-lines file (default <root>/labels.csv or labels.jsonl)"))
    classes: Optional[list[str]] = Field(None, description=(
        "folder: the foreground class names in index order (a label outside them is an error); "
        "default: the sorted names found in the labels file"))
    val_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "folder without a 'split' column: share of the images hashed into the 'val' split"))
    split_seed: int = Field(0, description="folder without a 'split' column: seed of that hash")
    coco_year: Literal[2014, 2017] = 2017
    coco_classes: Literal["all", "voc"] = Field("voc", description="80 COCO classes or the 20 VOC ones")
    coco_mapping: Optional[dict[str, str]] = Field(None, description=(
        "coco_classes=voc: COCO category name -> VOC class name (default: the 20 matching "
        "classes, e.g. 'motorcycle' -> 'motorbike'); unmapped COCO classes become background"))
    synthetic: SyntheticConfig = SyntheticConfig()


# --------------------------------------------------------------------------- stage 1
class ClassifierConfig(StrictModel):
    """Stage 1: the MCIS co-attention classifier (defaults = the official recipe)."""

    method: Literal["mcis", "cam"] = Field(
        "mcis", description="mcis: the co-attention classifier on image pairs; cam: the single-image "
        "CAM baseline (same backbone, extra convs and CAM head, L_basic only; PSA / IRN), whose "
        "stage 2 writes plain CAMs")
    backbone: str = Field("vgg16", description="vgg16 | resnet50 | resnet101 | efficientnet_lite0 | tiny")
    backbone_options: dict[str, Any] = Field(
        default_factory=dict, description="extra build_backbone options, e.g. {width: 16} for tiny")
    pretrained: bool = True
    feature_channels: int = Field(512, ge=1, description="channels of the 3 extra convs (official 512)")
    freeze_bn: bool = Field(False, description="keep backbone BatchNorm statistics and affine fixed")
    freeze_backbone: bool = Field(False, description="train only the extra convs and heads (deviation "
                                  "for CPU budgets; official: the whole network at 1x lr)")
    cache_features: bool = Field(False, description="with freeze_backbone and no colour jitter / flip: "
                                 "compute the frozen backbone's features of every training view once "
                                 "and train the heads on them (same losses, a fraction of the time)")
    feature_cache_mb: int = Field(4096, ge=1, description="cache_features: CPU memory the float32 "
                                  "features may take (checked before any compute)")
    scale_affinity: bool = Field(False, description="divide the affinity P by sqrt(C) (deviation; "
                                 "official: unscaled)")
    init: Literal["official", "kaiming_fan_in"] = Field(
        "official", description="new-layer init. official: extra convs and CAM head He-normal "
        "fan-out, W_P / class-aware conv / W_B PyTorch default; kaiming_fan_in (deviation): "
        "He-normal fan-in everywhere")
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(5, ge=1, description="pairs per step, in total over all DDP processes "
                            "(as segmentor.batch_size; official 5)")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd (official: momentum, Nesterov) | adamw (deviation: the demo's "
                           "from-scratch tiny backbone barely learns with SGD in 300 steps)")
    lr: float = Field(1e-3, gt=0)
    new_layer_lr_mult: float = Field(10.0, gt=0, description="lr factor of the new layers' weights "
                                     "(biases 2x that; official 10)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    lr_steps: list[int] = Field(default_factory=lambda: [5, 10], description="epochs where lr *= lr_gamma")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    image_size: int = Field(256, ge=32, description="training views are squashed to this square "
                            "(official 256)")
    colour_jitter: tuple[float, float, float, float] = Field(
        (0.3, 0.3, 0.3, 0.1), description="brightness, contrast, saturation, hue of the training "
        "views (official; the self-pair copies are never jittered)")
    flip: bool = Field(False, description="random horizontal flip of the training views (deviation; "
                       "official: none, the flip only enters through the flip self-pair)")
    contrastive_from_epoch: int = Field(2, ge=0, description="epoch (0-based) at which L_con-co-att joins")
    self_pairs: bool = Field(True, description="also pair each image with its flip / 0.75x / 2x copies "
                             "(official), made from the original image without jitter")
    random_partner_fraction: float = Field(0.0, ge=0, le=1, description="share of partners drawn at random")
    amp: bool = Field(False, description="mixed precision on CUDA (deviation, about 2x faster; "
                      "official: float32; the affinity P stays float32 either way)")
    num_workers: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1, description="log step metrics every N steps")

    @model_validator(mode="after")
    def _cacheable(self):
        if self.cache_features:
            if not self.freeze_backbone:
                raise ValueError("cache_features needs freeze_backbone=true (a trained backbone changes "
                                 "its features every step)")
            if any(self.colour_jitter) or self.flip:
                raise ValueError("cache_features needs colour_jitter=[0, 0, 0, 0] and flip=false (random "
                                 "views differ every epoch)")
        return self


# --------------------------------------------------------------------------- stage 2
class MapsConfig(StrictModel):
    """Stage 2: localization maps averaged over related images.

    ``protocol: official`` is the official ``test.py``: the image squashed to ``image_size``,
    one view, candidates [flip self-pair (I's side), its flipped side, 0.75x and 2x copies'
    sides, the related map] at feature resolution, the first always counted and the others
    when sigmoid(mean) > 0.1, each max-normalised, summed over 5, upsampled (bicubic).
    ``multiscale`` (ours) runs every (scale, flip) view of ``scales`` x ``flip`` for the related
    map, uses I's side of the scaled self-pairs, always keeps the related map and normalises
    after upsampling (see ``stages.generate_cams``)."""

    split: Optional[str] = Field(None, description="split to generate maps for (default: data.train_split)")
    protocol: Literal["official", "multiscale"] = Field(
        "official", description="official: the official test.py rule (one squashed view); "
        "multiscale (ours): scales x flip views, see stages.generate_cams")
    num_related: int = Field(3, ge=0, description="k related images sharing the class (official 3)")
    self_pairs: bool = Field(True, description="flip / 0.75x / 2x self-pair candidates (official)")
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                description="multiscale protocol: view scales (official: [1.0] only)")
    flip: bool = Field(False, description="multiscale protocol: add flipped views (official: none)")
    image_size: Optional[int] = Field(None, ge=16, description=(
        "resize images to this square for the network (maps are resized back). None: the "
        "classifier's image_size under the official protocol (official 256), the native size "
        "under multiscale"))
    related_pool: int = Field(64, ge=0, description=(
        "draw the k related images of (I, c) from the related_pool images of class c nearest to "
        "I in a seeded random order of the split (each still uniform over the class, as the "
        "official draw; bounds the features stage 2 holds in memory). 0: the whole class"))
    cache_mb: int = Field(4096, ge=1, description=(
        "memory for the float16 base-view features of images and partners (GPU memory on CUDA); "
        "a feature evicted early is recomputed (counted in features_recomputed)"))
    full_resolution: bool = Field(False, description=(
        "store maps at image size (n x H x W float16) instead of at feature resolution "
        "(upsampled bicubic on read)"))
    checkpoint_epoch: Optional[int] = Field(11, ge=1, description=(
        "classifier checkpoint after this many epochs (1-based; the official test.sh loads "
        "pascal_voc_epoch_10.pth, whose 10 is 0-based: the state after 11 epochs). None: the last"))
    batch_size: int = Field(8, ge=1)
    workers: int = Field(1, ge=1, description="processes on CPU")
    background_thresholds: list[float] = Field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)], min_length=1,
        description="background thresholds swept when scoring maps")

    @model_validator(mode="after")
    def _protocol_fields(self):
        if self.protocol == "official":
            if self.scales != [1.0] or self.flip:
                raise ValueError("maps.scales / maps.flip apply to protocol 'multiscale'; the official "
                                 "protocol uses one view (set maps.protocol=multiscale, or scales=[1.0] "
                                 "and flip=false)")
        return self


# --------------------------------------------------------------------------- stage 3
class CRFConfig(StrictModel):
    """Stage 3: dense-CRF refinement of the maps into pseudo-masks.

    ``preset`` picks a peer code base's parameters (``pipeline.crf_params.PRESETS``: psa, irn,
    clip_es, toco); every field below that is set (not None) overrides the preset's value
    (``pipeline.crf_params.resolve_params`` merges them; ``stages.refine_crf`` documents each
    parameter). Inconsistent combinations are rejected when the config is validated."""

    preset: Literal["psa", "irn", "clip_es", "toco", "oaa"] = Field(
        "psa", description="psa | irn | clip_es | toco: dense CRF with that code base's parameters; "
        "oaa: the official MCIS pseudo-GT rules (gen_gt.py: maps + saliency_dir, no CRF)")
    source: Literal["maps", "cams"] = Field(
        "maps", description="which maps of stage 2's files are refined: the MCIS maps, or the plain "
                            "CAMs of the same classifier (ablation: what co-attention adds)")
    iterations: Optional[int] = Field(None, ge=1, description="mean-field iterations")
    unary: Optional[Literal["scores", "labels"]] = Field(
        None, description="scores: U = -log [bg, M_1..M_n] (PSA); labels: argmax of [bg, M] as hard "
                          "labels with probability gt_prob (IRN)")
    gt_prob: Optional[float] = Field(None, gt=0, lt=1, description="labels unary: P(argmax label)")
    background: Optional[Literal["constant", "power"]] = Field(
        None, description="background score: constant bg_threshold, or (1 - max_c M_c)^alpha")
    bg_threshold: Optional[float] = Field(None, ge=0, le=1, description="constant background score "
                                          "(IRN conf_fg_thres)")
    alpha: Optional[float] = Field(None, gt=0, description="power background exponent (PSA low alpha)")
    bg_low_threshold: Optional[float] = Field(
        None, ge=0, le=1, description="constant background of a second, confident-background run "
                                      "(IRN conf_bg_thres); where the runs disagree -> 255; "
                                      "equal to bg_threshold: one run")
    alpha_high: Optional[float] = Field(
        None, gt=0, description="power background of a second, confident-background run (PSA high "
                                "alpha); where the runs disagree -> 255; equal to alpha: one run")
    gaussian_sxy: Optional[float] = Field(None, gt=0, description="Gaussian kernel position std (px)")
    gaussian_compat: Optional[float] = Field(None, ge=0, description="Gaussian kernel weight")
    bilateral_sxy: Optional[float] = Field(None, gt=0, description="bilateral kernel position std (px)")
    bilateral_srgb: Optional[float] = Field(None, gt=0, description="bilateral kernel colour std")
    bilateral_compat: Optional[float] = Field(None, ge=0, description="bilateral kernel weight")
    confidence: Optional[float] = Field(None, ge=0, le=1, description="max posterior below this -> "
                                        "255 (0: off)")
    downscale: Optional[float] = Field(None, gt=0, le=1, description="run the CRF at this image scale "
                                       "(position stds scaled alike), posterior upsampled back")
    saliency_dir: Optional[Path] = Field(None, description="optional <id>.png saliency maps (0-255) "
                                         "used as an extra background cue (OAA/MCIS rules)")
    saliency_ignore: float = Field(32 / 255, ge=0, le=1, description="CRF background pixels with "
                                   "saliency >= this -> 255 (saliency mode)")
    min_foreground: float = Field(0.01, ge=0, le=1, description="saliency mode: an image with less "
                                  "foreground than this fraction becomes all 255")
    skip_missing: bool = Field(False, description="skip (and count) images whose map file is "
                               "missing instead of failing")
    workers: int = Field(1, ge=1, description="processes refining chunks of images")
    chunk_size: int = Field(16, ge=1, description="images per work unit")
    dask_address: Optional[str] = Field(None, description="scheduler address of a Dask cluster to "
                                        "run the chunks on (instead of local processes)")

    @model_validator(mode="after")
    def _consistent_with_preset(self):
        """The preset merged with the set fields must make sense (e.g. no constant-background
        threshold on a power-background preset): checked here, not when stage 3 starts."""
        from pipeline.crf_params import resolve_params

        resolve_params(self)
        return self


# --------------------------------------------------------------------------- stage 4
class SegmentorConfig(StrictModel):
    """Stage 4: fully supervised segmentors trained on the pseudo-masks."""

    models: list[str] = Field(default_factory=lambda: ["deeplab_largefov"], min_length=1)
    backbone: str = Field("resnet101", description="resnet50 | resnet101 | ... (see models.segmentors)")
    pretrained: bool = True
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="model name -> extra keyword arguments of its builder "
                                          "(e.g. {'sanet': {'attn_pool': 4}})")
    iterations: int = Field(20000, ge=1)
    batch_size: int = Field(16, ge=1)
    crop_size: int = Field(512, ge=16)
    scale_range: tuple[float, float] = (0.5, 2.0)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd: SGD with momentum (the R-D8 recipes); adamw: AdamW, betas (0.9, 0.999), "
                           "eps 1e-8, decoupled weight_decay (SegFormer / mmseg ViT-UperNet: 0.01)")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    poly_power: float = Field(0.9, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_iters: int = Field(0, ge=0, description="linear warm-up iterations (lr from warmup_ratio*lr)")
    warmup_ratio: float = Field(0.1, gt=0, le=1)
    head_lr_mult: float = Field(1.0, gt=0, description="lr multiplier of the non-backbone parameters "
                                "(1 in mmseg's R-D8 recipes, 10 in OCRNet/SETR's)")
    flip: bool = Field(True, description="random horizontal flip of the crops")
    colour_jitter: tuple[float, float, float, float] = Field(
        (0.3, 0.3, 0.3, 0.1), description="brightness, contrast, saturation, hue of the crops")
    loss_average: Literal["labelled", "all"] = Field(
        "labelled", description="CE averaged over labelled pixels (default: pseudo-masks have many "
                                "255s), or over all pixels with ignored ones counting 0 (mmseg default)")
    class_balanced: bool = Field(False, description="median-frequency class weights from the pseudo-masks")
    class_weight_max: float = Field(10.0, ge=1, description="clip of the class-balanced weights")
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1, description="iterations between logged losses")
    amp: bool = True
    num_workers: int = Field(2, ge=0)
    parallel: bool = Field(False, description="train the listed models in parallel processes")
    nproc: int = Field(1, ge=1, description="DDP processes per model (>1 launches torchrun: gloo on "
                                            "CPU, NCCL on CUDA); batch_size is the total over them")

    @field_validator("models")
    @classmethod
    def _registered_models(cls, models: list[str]) -> list[str]:
        """Every name must be a registered segmentor (read from models/segmentors' source,
        without importing torch): refused when the config is loaded, not when stage 4 starts."""
        from pipeline.registry import segmentor_names

        unknown = [m for m in models if m not in segmentor_names()]
        if unknown:
            raise ValueError(f"unknown segmentor(s) {', '.join(map(repr, unknown))}; available: "
                             f"{', '.join(segmentor_names())}")
        return models

    @model_validator(mode="after")
    def _scale_order(self):
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        return self


# --------------------------------------------------------------------------- stage 5
class EvaluationConfig(StrictModel):
    """Stage 5: scoring maps, pseudo-masks and segmentors."""

    split: Optional[str] = Field(None, description="segmentor split (default: data.val_split)")
    train_split: Optional[str] = Field(None, description=(
        "split the maps and pseudo-masks are scored on (default: the maps' split); VOC: 'train' "
        "(1,464 images with ground truth) while maps cover train_aug"))
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    flip: bool = False
    mode: Literal["whole", "slide"] = "whole"
    crop_size: int = Field(512, ge=16)
    stride: int = Field(341, ge=1)
    crf: bool = False
    map_threshold: Optional[float] = Field(None, ge=0, le=1, description="fixed bg threshold (None: sweep)")
    previews: int = Field(8, ge=0, description="preview grids per segmentor and kind (evaluation split; images stages 2-3 covered)")


# --------------------------------------------------------------------------- pipeline
class PipelineConfig(StrictModel):
    """The whole pipeline: what the Prefect flow and ``wsss run`` take."""

    name: str = Field("demo", min_length=1, description="preset/deployment name (MLflow experiment)")
    workdir: Path = Field(Path("work"), description="where stage outputs, services and caches live")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(
        None, ge=1, description="CPU threads for torch in each stage (torch.set_num_threads); "
        "worker processes (maps.workers, segmentor.parallel / nproc) share this budget. Not part "
        "of any stage's key. Default: torch's choice in the stage process, the cores this "
        "process may run on for the split")
    data: DataConfig = DataConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    maps: MapsConfig = MapsConfig()
    crf: CRFConfig = CRFConfig()
    segmentor: SegmentorConfig = SegmentorConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _checkpoint_exists(self):
        epoch = self.maps.checkpoint_epoch
        if epoch is not None and epoch > self.classifier.epochs:
            raise ValueError(f"maps.checkpoint_epoch={epoch}, but classifier.epochs={self.classifier.epochs} "
                             f"writes checkpoints 1..{self.classifier.epochs} only (set "
                             f"maps.checkpoint_epoch to one of them or null for the last)")
        return self


# --------------------------------------------------------------------------- presets
def _preset_dict(name: str) -> dict[str, Any]:
    if name == "voc":
        return {
            "name": "voc",
            "workdir": "work/voc",
            "data": {"dataset": "voc", "root": "data/VOCdevkit/VOC2012", "train_split": "train_aug",
                     "val_split": "val"},
            "maps": {"workers": 2},
            "crf": {"preset": "psa", "workers": 2},
            "segmentor": {"models": ["deeplab_largefov", "sanet", "ocrnet", "danet"],
                          "backbone": "resnet101", "iterations": 20000, "batch_size": 16,
                          "crop_size": 512},
            "evaluation": {"train_split": "train", "scales": [0.5, 0.75, 1.0, 1.25, 1.5], "flip": True},
        }
    if name == "coco":
        return {
            "name": "coco",
            "workdir": "work/coco",
            "data": {"dataset": "coco", "root": "data/coco", "train_split": "train", "val_split": "val",
                     "coco_year": 2014, "coco_classes": "all"},
            "maps": {"split": "train", "workers": 2},
            "crf": {"preset": "psa", "workers": 2},
            "segmentor": {"models": ["deeplab_largefov", "sanet"], "backbone": "resnet101",
                          "iterations": 80000, "batch_size": 16, "crop_size": 512},
        }
    if name == "demo":
        return {
            "name": "demo",
            "workdir": "work/demo",
            # class colours: from-scratch networks learn the classes in a few hundred steps
            # (without the cue a segmentor trained on the ground truth reaches 18 mIoU in 300
            # iterations vs 14 for all-background; with it 56)
            "data": {"dataset": "synthetic", "root": "work/demo/data/synthetic",
                     "synthetic": {"class_colours": True}},
            # classifier from scratch: AdamW without the 10x new-layer lr (SGD lr 0.01 x10 stays
            # at the label prior: maps = all-background); undilated tiny backbone (receptive
            # field 95 px instead of 223 px on 96-px images: CAMs were diffuse); 40 epochs
            # (800 steps, ~1.3 s per epoch on 2 free cores)
            "classifier": {"backbone": "tiny", "backbone_options": {"width": 16, "dilations": [1, 1]},
                           "pretrained": False, "feature_channels": 64, "epochs": 40, "batch_size": 8,
                           "optimizer": "adamw", "lr": 1e-3, "new_layer_lr_mult": 1.0,
                           "weight_decay": 1e-4,
                           "lr_steps": [32], "image_size": 96, "self_pairs": False,
                           "colour_jitter": [0, 0, 0, 0], "flip": True,
                           "contrastive_from_epoch": 2, "amp": False, "num_workers": 0},
            # one process: 160 images are 7-9 s of work, two spawned workers took 18-20 s
            # (each imports torch, the stage and the parent's __main__ first)
            "maps": {"num_related": 3, "checkpoint_epoch": None, "batch_size": 16, "workers": 1},
            # MCIS maps (official protocol) are complete but flat (best map threshold 0.9): PSA's
            # power background (1 - max M)^4 labels nearly everything foreground; IRN's constant
            # background with thresholds 0.8 / 0.7 gives 76.8 mIoU (0.7 / 0.6: 65.6, 0.9 / 0.8: 67.5)
            "crf": {"preset": "irn", "bg_threshold": 0.8, "bg_low_threshold": 0.7, "workers": 2,
                    "chunk_size": 16},
            # data loading in the training process (num_workers 0): a loader process competes
            # with the two compute threads on 2 cores (150 iterations: 25.5 s vs 28-38 s)
            # tiny random-init backbone (width 32: DeepLab 53 vs 34 mIoU at width 16, SANet 65
            # vs 61): a high lr is what makes 300 iterations enough; LargeFOV without its 0.5
            # dropout and with dilation 2 (the 96-px images give a 12x12 feature map, where
            # dilation 12 would see mostly padding; 2 gave 55.5 vs 53.0 for 4)
            "segmentor": {"models": ["sanet", "deeplab_largefov"], "backbone": "tiny",
                          "pretrained": False, "iterations": 300, "batch_size": 8, "crop_size": 96,
                          "scale_range": [0.75, 1.25], "lr": 0.1, "warmup_iters": 20,
                          "head_lr_mult": 1.0, "checkpoint_every": 100, "amp": False,
                          "num_workers": 0, "class_balanced": False,
                          "model_options": {"sanet": {"backbone_options": {"width": 32}},
                                            "deeplab_largefov": {"channels": 128, "dilation": 2,
                                                                 "dropout_ratio": 0.0,
                                                                 "backbone_options": {"width": 32}}}},
            "evaluation": {"crop_size": 96, "stride": 64, "previews": 4},
        }
    if name == "voc-mini":
        return _voc_mini_preset()
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


VOC_MINI_ROOT = "../shared/data/voc-mini/VOCdevkit/VOC2012"


def _voc_mini_preset() -> dict[str, Any]:
    """voc-mini: 330 + 200 real VOC 2012 photos (``wsss data prepare voc-mini`` builds them from
    a VOC download), sized for 2 CPU cores in about 30 minutes (docs/benchmarks.md). The
    ImageNet EfficientNet-Lite0 (offline, in a wheel) at output stride 16 is the frozen
    classifier backbone, its features computed once (classifier.cache_features); the segmentors
    fine-tune it (300 iterations). Deviations from the official recipe, for the CPU budget:
    frozen backbone, 128 extra-conv channels, 224-px views without colour jitter, 20 epochs of
    330 images (1,320 steps; lr x0.1 after 14; 10 epochs gave MCIS maps 21.9 mIoU on train, 20
    gave 24.7), no self-pairs in training (with them the co-attentive logits of 161 of 548
    train (image, class) maps stayed negative everywhere: MCIS maps 11.6). Stage 2 keeps the
    official self-pair candidates: without them an MCIS map is the related-image map alone,
    flat where the co-attention has not learnt to match objects (20 photos: MCIS maps 4.1 mIoU
    = all-background, plain CAMs of the same model 16.0). docs/benchmarks.md has the figures."""
    lite = {"backbone_options": {"output_stride": 16}}
    return {
        "name": "voc-mini",
        "workdir": "work/voc-mini",
        "data": {"dataset": "voc", "root": VOC_MINI_ROOT, "train_split": "train", "val_split": "val"},
        "classifier": {"backbone": "efficientnet_lite0", "backbone_options": {"output_stride": 16},
                       "pretrained": True, "freeze_backbone": True, "cache_features": True,
                       "colour_jitter": [0, 0, 0, 0], "flip": False, "feature_channels": 128,
                       "image_size": 224, "epochs": 20, "lr_steps": [14], "self_pairs": False,
                       "num_workers": 0},
        "maps": {"checkpoint_epoch": None, "batch_size": 8, "workers": 1},
        "crf": {"preset": "psa", "workers": 2},
        # LargeFOV at output stride 16: dilation 6 sees what 12 sees at stride 8
        "segmentor": {"models": ["sanet", "deeplab_largefov"], "backbone": "efficientnet_lite0",
                      "pretrained": True, "iterations": 300, "batch_size": 8, "crop_size": 224,
                      "scale_range": [0.5, 1.5], "lr": 0.01, "head_lr_mult": 10.0, "warmup_iters": 30,
                      "checkpoint_every": 100, "amp": False, "num_workers": 1,
                      "model_options": {"sanet": dict(lite),
                                        "deeplab_largefov": {**lite, "channels": 512, "dilation": 6}}},
        "evaluation": {"crop_size": 224, "stride": 160, "previews": 4},
    }


def preset(name: str) -> PipelineConfig:
    """The named preset (``voc``, ``coco`` or ``demo``) as a validated config."""
    return _validate(_preset_dict(name), source=f"preset {name!r}")


# --------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {e['msg']}{got_text}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def _validate(data: dict[str, Any], source: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"crf.iterations=5"`` -> (["crf", "iterations"], 5). Values are parsed as YAML, so
    ``[1, 2]``, ``true``, ``0.5`` and ``null`` work; anything else stays a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty field name in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into a (nested) config dict; unknown paths are left for the
    model validation to reject with their full path."""
    data = json.loads(json.dumps(data, default=str))
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON file as a dict; a file may name a ``preset`` to start from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("preset", None)
    return _deep_merge(_preset_dict(base), data) if base else data


def load_config(source: str | Path | None = "demo", overrides: list[str] | None = None) -> PipelineConfig:
    """Build a config from a preset name or a YAML/JSON file, then dotted overrides.

    >>> load_config("demo", ["crf.iterations=5"]).crf.iterations
    5
    """
    if source is None:
        data, name = {}, "defaults"
    elif str(source) in PRESETS:
        data, name = _preset_dict(str(source)), f"preset {source!r}"
    else:
        data, name = read_config_file(Path(source)), str(source)
    if overrides:
        data = apply_overrides(data, overrides)
        name += " with overrides " + ", ".join(overrides)
    return _validate(data, source=name)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """JSON-ready dict (paths as strings) of any config model."""
    return config.model_dump(mode="json")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"crf": {"iterations": 5}}`` -> ``{"crf.iterations": 5}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
