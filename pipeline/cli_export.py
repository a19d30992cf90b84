"""``wsss export --model M --format torchscript|onnx --out PATH``: a trained segmentor as a
deployable TorchScript / ONNX file plus a JSON sidecar (:mod:`stages.export` does the work;
torch is imported only once the arguments parse). Exit status 0 when written, 1 when the model
cannot be exported or its export differs from the PyTorch model beyond the tolerance (nothing
written), 2 for a bad ``--model`` / ``--size`` or ``--format onnx`` without the ``onnx`` extra."""

import argparse
import sys
from pathlib import Path


def _cmd_export(args: argparse.Namespace) -> int:
    from stages.export import require_onnx, parse_size

    size = parse_size(args.size)
    if args.format == "onnx":
        require_onnx()                      # before loading anything
    from pipeline import runtime
    from stages.export import ExportError, export

    if args.threads:
        runtime.apply_threads(args.threads)
    try:
        result = export(args.model, args.format, Path(args.out), size=size, segmentor=args.segmentor,
                        tracking_uri=args.tracking_uri, opset=args.opset,
                        say=lambda text: print(text, flush=True))
    except ExportError as err:
        if getattr(args, "debug", False):
            raise
        print(f"wsss export: {err}", file=sys.stderr)
        return 1
    meta = result.meta
    h, w = meta["input"]["size"]
    axes = "dynamic batch/height/width" if result.dynamic_size else f"fixed {h}x{w}, dynamic batch"
    print(f"[wsss] export: {meta['model_name'] or 'segmentor'} from {meta['source']} -> {result.path} "
          f"({args.format}, {axes}; max |diff| {result.max_abs_diff:.2g} <= {meta['verification']['tolerance']:g} "
          f"with {meta['verification']['checked_with']}; {result.seconds:.1f} s); sidecar {result.sidecar}",
          flush=True)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a trained segmentor as TorchScript or ONNX (+ JSON sidecar)")
    p.add_argument("--model", "-m", required=True,
                   help="as wsss predict: model.pt, a train_segmentor output or work directory, an MLflow "
                        "run id, runs:/<id>/model or models:/<name>/<version>")
    p.add_argument("--format", "-f", required=True, choices=("torchscript", "onnx"),
                   help="onnx needs the onnx extra: pip install 'wsss[onnx]'")
    p.add_argument("--out", "-o", required=True, help="the file to write (its sidecar: <out>.json)")
    p.add_argument("--segmentor", default=None, help="which segmentor of a stage output holding several")
    p.add_argument("--size", default=None, metavar="N|HxW",
                   help="sample input size (default: the training crop, segmentor.crop_size)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for run ids and models:/ (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of errors (default: one line)")
    p.set_defaults(func=_cmd_export)
