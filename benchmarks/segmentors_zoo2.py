"""Params, FLOPs, CPU/GPU forward time and memory of the segmentor zoo's second half
(SETR Naive/PUP/MLA, CCNet, ANN, DNLNet, ISANet, ISNet, FCN/OCR on HRNet).

    .venv/bin/python benchmarks/segmentors_zoo2.py [--size 512] [--models ccnet setr_mla ...]
                                                   [--time] [--repeats 2] [--classes 21]

Defaults are the papers' configurations: R-101-D8 with mmseg's deep stem for the R-D8 models,
ViT-L/16 for SETR, HRNetV2-W48 for the HRNet models, 21 classes. Printed per model:

* ``params`` (M) and models.md's figure where the table has one (``table``, mmseg 1.2.2),
* ``GMACs`` of one forward pass in eval mode (no auxiliary heads; multiply-adds counted
  once, as mmengine's ``get_model_complexity_info`` in models.md), counted with
  ``torch.utils.flop_counter`` on the ``meta`` device, so no weights are allocated; it counts
  convolutions and matrix products only (not norms, activations, interpolation), which puts
  it within about 1 % of models.md's figures,
* with ``--time``: the median forward time of one image at ``--size`` (CUDA when present,
  else CPU with the current thread count) and the peak memory of that forward
  (``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident-set growth above the
  loaded model, i.e. activations and workspace, sampled every 2 ms, with glibc set to map
  every allocation above 64 KiB on its own so that freed memory leaves the resident set).
"""

import argparse
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from models.segmentors import build_segmentor  # noqa: E402

R101 = {"backbone": "resnet101", "backbone_options": {"deep_stem": True}}
MODELS = {
    "setr_naive": ({"backbone": "vit_large"}, 305.42),
    "setr_pup": ({"backbone": "vit_large"}, 317.16),
    "setr_mla": ({"backbone": "vit_large"}, 309.37),
    "ccnet": (R101, 68.82),
    "ann": (R101, 65.22),
    "dnlnet": (R101, 69.02),
    "isanet": (R101, 56.70),
    "isnet": (R101, None),
    "fcn_hrnet": ({"backbone": "hrnet_w48"}, 65.86),
    "ocrnet_hrnet": ({"backbone": "hrnet_w48"}, 70.37),
}


def _options(name: str, size: int) -> dict:
    options = dict(MODELS[name][0])
    if name.startswith("setr"):
        options["img_size"] = size   # position embedding stored for the crop size
    return options


class _NoAutocast:
    """Stands in for ``torch.autocast`` while counting on the meta device (which autocast does
    not accept): the attention blocks' float32 guards do not change the operation count."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count(name: str, size: int, classes: int) -> dict:
    """Parameters and multiply-adds, on the meta device."""
    autocast, torch.autocast = torch.autocast, _NoAutocast
    try:
        return _count(name, size, classes)
    finally:
        torch.autocast = autocast


def _count(name: str, size: int, classes: int) -> dict:
    with torch.device("meta"):
        model = build_segmentor(name, classes, **_options(name, size)).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, 3, size, size))
    return {"params_m": params / 1e6, "gmacs": counter.get_total_flops() / 2e9}


def _track_cpu_allocations() -> None:
    """Make glibc serve every allocation above 64 KiB with its own mapping (fixed threshold,
    no dynamic raise) and return freed memory, so the resident set follows the live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the CPU memory figure is then a lower bound


def timed(name: str, size: int, classes: int, repeats: int) -> dict:
    """Median forward time and peak memory of one image on the best available device."""
    import psutil
    _track_cpu_allocations()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_segmentor(name, classes, **_options(name, size)).eval().to(device)
    x = torch.randn(1, 3, size, size, device=device)
    proc = psutil.Process()
    rss0, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():  # resident-set peak above the loaded model, sampled every 2 ms
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - rss0)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    done.set()
    sampler.join()
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak[0]) / 2**20
    return {"device": device.type, "seconds": statistics.median(times), "memory_mib": memory}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--time", action="store_true", help="also time a real forward pass")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    header = f"{'model':<14}{'backbone':<11}{'params M':>10}{'table M':>9}{'diff %':>8}{'GMACs':>9}"
    if args.time:
        header += f"{'device':>8}{'s/img':>9}{'mem MiB':>10}"
    print(f"input 1x3x{args.size}x{args.size}, {args.classes} classes, threads {torch.get_num_threads()}")
    print(header)
    for name in args.models:
        figures = count(name, args.size, args.classes)
        table = MODELS[name][1]
        diff = f"{100 * (figures['params_m'] / table - 1):+.2f}" if table else "-"
        line = (f"{name:<14}{MODELS[name][0]['backbone']:<11}{figures['params_m']:>10.2f}"
                f"{(f'{table:.2f}' if table else '-'):>9}{diff:>8}{figures['gmacs']:>9.1f}")
        if args.time:
            t = timed(name, args.size, args.classes, args.repeats)
            line += f"{t['device']:>8}{t['seconds']:>9.2f}{t['memory_mib']:>10.0f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
