"""Speed and memory of every stage at the voc settings, on this device (meant for a GPU).

    .venv/bin/python benchmarks/gpu.py [--samples 5] [--json out.json] [--tiny]

The ``voc`` preset's recipe (VGG16 classifier on 256 px pairs, batches of 5; stage 2's
official protocol with k = 3; the segmentors of ``segmentor.models`` on 512 px crops, batch
16 split over the visible GPUs) is timed with :mod:`stages.plan`'s samplers on a generated
synthetic dataset (20 classes, 384 px images: speed does not depend on the pixels; the real
VOC photos are not needed). Printed per stage: seconds per step and the rate (classifier
pairs/s, stage-2 images/s, segmentor iterations/s), peak GPU memory, the step's FLOPs
(torch's FlopCounterMode) and the fraction of the device's dense fp16 tensor peak they
reach, and, for the segmentors mmsegmentation publishes on VOC12aug, its training memory
(metafile of mmseg 1.2.2: 4 images per V100; mmseg does not publish a per-iteration time
for these configs in its metafiles, only in the training logs it hosts online).

``--tiny`` swaps in tiny backbones and small crops so the script runs in seconds on a CPU
(the test suite does this, so the script does not rot).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from stages import plan  # noqa: E402

#: dense fp16 tensor-core peak (TFLOPS) by device name fragment (vendor data sheets)
FP16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}

#: mmseg 1.2.2 metafiles, "Pascal VOC 2012 + Aug", R-101-D8 / HRNet-W48, 512x512, 20k:
#: training memory per GPU (GB) at 4 images per GPU on 4x V100, and mIoU
MMSEG_VOC12AUG = {"danet": ("danet_r101-d8_4xb4-20k_voc12aug-512x512", 9.9, 76.02),
                  "ocrnet": ("ocrnet_hr48_4xb4-20k_voc12aug-512x512", 8.1, 77.72),
                  "deeplabv3plus": ("deeplabv3plus_r101-d8_4xb4-20k_voc12aug-512x512", 11.0, 77.22),
                  "deeplabv3": ("deeplabv3_r101-d8_4xb4-20k_voc12aug-512x512", 9.6, 78.70),
                  "pspnet": ("pspnet_r101-d8_4xb4-20k_voc12aug-512x512", 9.6, 78.47),
                  "fcn": ("fcn_r101-d8_4xb4-20k_voc12aug-512x512", 9.2, 71.16),
                  "ccnet": ("ccnet_r101-d8_4xb4-20k_voc12aug-512x512", 9.5, 77.27),
                  "ann": ("ann_r101-d8_4xb4-20k_voc12aug-512x512", 9.5, 77.47),
                  "isanet": ("isanet_r101-d8_4xb4-20k_voc12aug-512x512", 9.465, 78.46)}

TINY = ["classifier.backbone=tiny", "classifier.backbone_options={width: 8}", "classifier.feature_channels=32",
        "classifier.image_size=64", "segmentor.backbone=tiny", "segmentor.crop_size=64",
        "segmentor.batch_size=2", "segmentor.models=[sanet]", "data.synthetic.image_size=64"]


def fp16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in FP16_PEAK_TFLOPS.items() if key in name), None)


def voc_config(workdir: Path, tiny: bool, extra=()):
    gpus = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    overrides = [f"workdir={workdir}", "data.dataset=synthetic", f"data.root={workdir / 'data'}",
                 "data.synthetic.num_classes=20", "data.synthetic.num_train=24", "data.synthetic.num_val=4",
                 "data.synthetic.image_size=384", "data.train_split=train", "maps.split=train",
                 "evaluation.train_split=null", "classifier.pretrained=false", "segmentor.pretrained=false",
                 f"segmentor.nproc={gpus}"] + (TINY if tiny else []) + list(extra)
    return load_config("voc", overrides)


def rows_for(estimates, device) -> list[dict]:
    peak = fp16_peak(device)
    rows = []
    for e in estimates:
        if e.stage in ("refine_crf", "evaluate"):
            continue
        unit = {"train_classifier": "pairs/s", "generate_cams": "images/s"}.get(e.stage, "it/s")
        per = e.seconds_per_step
        rate = (1 / per) * (5 if e.stage == "train_classifier" else 1)
        achieved = e.flops_per_step / per / 1e12 if e.flops_per_step else 0.0
        model = e.stage.split(":", 1)[-1]
        ref = MMSEG_VOC12AUG.get(model)
        rows.append({"stage": e.stage, "seconds_per_step": per, "rate": rate, "unit": unit,
                     "gpu_peak_gb": e.gpu_peak_mb / 1024, "tflop_per_step": e.flops_per_step / 1e12,
                     "achieved_tflops": achieved, "fp16_peak_fraction": achieved / peak if peak else None,
                     "mmseg_config": ref[0] if ref else None, "mmseg_memory_gb_4_per_gpu": ref[1] if ref else None})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke test)")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. classifier.amp=true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        config = voc_config(Path(tmp), args.tiny, args.set)
        summary, estimates = plan.make_estimates(config, samples=args.samples, device=device, count_flops=True,
                                                 stages=["train_classifier", "generate_cams", "train_segmentor"])
    rows = rows_for(estimates, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; classifier {config.classifier.backbone} {config.classifier.image_size}px x "
          f"{config.classifier.batch_size} pairs; segmentors {config.segmentor.backbone} "
          f"{config.segmentor.crop_size}px x {config.segmentor.batch_size} over {config.segmentor.nproc} GPU(s)")
    for r in rows:
        frac = f"{100 * r['fp16_peak_fraction']:.1f} % of fp16 peak" if r["fp16_peak_fraction"] else "fp16 peak n/a"
        ref = (f"; mmseg {r['mmseg_config']}: {r['mmseg_memory_gb_4_per_gpu']} GB at 4/GPU"
               if r["mmseg_config"] else "")
        print(f"{r['stage']:<34} {r['seconds_per_step']:.4f} s/step  {r['rate']:8.2f} {r['unit']:<9} "
              f"peak {r['gpu_peak_gb']:6.2f} GB  {r['tflop_per_step']:.3f} TFLOP/step  "
              f"{r['achieved_tflops']:.1f} TFLOPS ({frac}){ref}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
