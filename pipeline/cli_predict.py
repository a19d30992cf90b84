"""``wsss predict --model M --input DIR|FILE ... --out DIR``: segment new photos with a trained
segmentor (:mod:`stages.predict` does the work; torch is imported only once the arguments
parse). Exit status 0 when every image was predicted (or already was), 1 when some file was
skipped as unreadable, 2 for a bad ``--model`` / ``--input``."""

import argparse
from pathlib import Path


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales {text!r}: expected comma-separated numbers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--scales {text!r}: expected positive numbers")
    return values


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline import runtime
    from pipeline.config import CRFConfig
    from stages.predict import InferenceSettings, collect_inputs, load_model, predict_files
    from stages.refine_crf import resolve_params

    if args.threads:
        runtime.apply_threads(args.threads)
    device = runtime.select_device(args.device)
    files = collect_inputs(args.input)
    loaded = load_model(args.model, device, segmentor=args.segmentor, tracking_uri=args.tracking_uri)
    crf = resolve_params(CRFConfig(preset=args.crf_preset)) if args.crf else None
    settings = InferenceSettings(scales=args.scales, flip=args.flip, mode=args.mode,
                                 crop_size=args.crop_size, stride=args.stride, crf_params=crf,
                                 amp=not args.no_amp)
    print(f"[wsss] predict: {len(files)} image(s) with {loaded.model_name or 'segmentor'} from "
          f"{loaded.source} on {device} -> {Path(args.out)}", flush=True)
    report = predict_files(loaded, files, Path(args.out), settings, device, batch_size=args.batch_size,
                           overlays=args.overlay)
    print(f"[wsss] predict: {len(report.written)} written, {len(report.skipped_existing)} already "
          f"there, {len(report.failed)} unreadable (skipped)", flush=True)
    return 1 if report.failed else 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="segment images with a trained segmentor (palette PNG masks)")
    p.add_argument("--model", "-m", required=True,
                   help="model.pt, a train_segmentor output or work directory, an MLflow run id, "
                        "runs:/<id>/model or models:/<name>/<version>")
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="DIR|FILE",
                   help="image files and/or directories (searched recursively)")
    p.add_argument("--out", "-o", required=True, help="output directory (mirrors the input tree)")
    p.add_argument("--segmentor", default=None, help="which segmentor of a stage output holding several")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg with a class legend")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (equal sizes batch)")
    p.add_argument("--scales", type=_scales, default=[1.0], help="test-time scales, e.g. 0.75,1,1.25")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped views")
    p.add_argument("--mode", choices=("whole", "slide"), default="whole")
    p.add_argument("--crop-size", type=int, default=512, help="slide mode: window size")
    p.add_argument("--stride", type=int, default=341, help="slide mode: window stride")
    p.add_argument("--crf", action="store_true", help="refine with stage 3's dense CRF")
    p.add_argument("--crf-preset", default="psa", choices=("psa", "irn", "clip_es", "toco"),
                   help="CRF parameters (with --crf)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA (default: float16 autocast, as stage 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for run ids and models:/ (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of input errors (default: one line)")
    p.set_defaults(func=_cmd_predict)
