"""Forward+backward time, peak memory, parameters and FLOPs of every registered segmentor.

    python benchmarks/segmentors.py                       # all models, R-101-D8, 2x3x256x256, CPU (+CUDA)
    python benchmarks/segmentors.py --backbone tiny --models fcn,sanet --device cpu

One training step = forward in train mode, the model's own loss terms (``Segmentor.losses``
with cross-entropy on a random target, so auxiliary heads count), backward. Each model runs
in a fresh child process so the CPU peak memory of one does not hide another's:

* time: median of ``--repeats`` steps after one warm-up step;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` over the steps (weights included);
  CPU the process's peak resident set (``ru_maxrss``) over the steps minus the resident set
  just before the first step (model and input built), i.e. activations + gradients, not the
  weights (the FLOP counting runs after the timed steps, so it does not raise the peak);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass (counts
  2 FLOPs per multiply-add, i.e. twice mmseg's/fvcore's "FLOPs" = MACs) and over forward +
  backward;
* parameters: all of them, aux heads included.

Prints a markdown table (one row per model and device).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, backbone: str, device: str, batch: int, size: int, num_classes: int,
            repeats: int) -> dict:
    """One model on one device (runs in the child process)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from models.segmentors import build_segmentor

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_segmentor(name, num_classes, backbone=backbone, pretrained=False).to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, size, size, device=dev)
    target = torch.randint(0, num_classes, (batch, size, size), device=dev)

    def pixel_loss(logits, y):
        return F.cross_entropy(logits.float(), y, ignore_index=255)

    def step():
        outputs = model(x)
        loss = sum(model.losses(outputs, target, pixel_loss).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        return outputs

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base_rss = _rss_mb()
    outputs = step()  # warm-up
    out_shape = tuple(outputs["out"].shape)
    del outputs
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    fwd_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    return {"model": name, "device": device, "params_m": params / 1e6, "gflops_fwd": fwd_flops / 1e9,
            "gflops_step": step_flops / 1e9, "step_s": statistics.median(times), "peak_mb": peak,
            "out": "x".join(map(str, out_shape[1:])), "threads": torch.get_num_threads()}


def run_child(name: str, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--device", device,
           "--backbone", args.backbone, "--batch", str(args.batch), "--size", str(args.size),
           "--num-classes", str(args.num_classes), "--repeats", str(args.repeats)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"model": name, "device": device, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def format_table(rows: list[dict]) -> str:
    header = "| model | device | params (M) | GFLOPs fwd | GFLOPs fwd+bwd | step (s) | peak mem (MB) | logits |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['device']} | error: {r['error']} |||||")
            continue
        lines.append(f"| {r['model']} | {r['device']} | {r['params_m']:.2f} | {r['gflops_fwd']:.1f} | "
                     f"{r['gflops_step']:.1f} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | {r['out']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated (default: every registered model)")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--device", default="all", choices=["all", "cpu", "cuda"],
                        help="all = CPU, and CUDA when present")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(measure(args.one, args.backbone, args.device, args.batch, args.size,
                                 args.num_classes, args.repeats)))
        return 0

    import torch

    from models.segmentors import available
    names = [n for n in args.models.split(",") if n] or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(available())}")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda but torch.cuda.is_available() is False")
        devices.remove("cuda")
    print(f"# segmentors: backbone {args.backbone}, input {args.batch}x3x{args.size}x{args.size}, "
          f"{args.num_classes} classes, median of {args.repeats} steps, torch {torch.__version__}",
          flush=True)
    rows = []
    for device in devices:
        for name in names:
            row = run_child(name, args, device)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
