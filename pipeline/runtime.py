"""Where and how training runs: device, seeds and RNG state, mixed precision, DDP, checkpoints.

Shared by the training stages so that "CPU everywhere, CUDA when present, DDP under
torchrun" is implemented once:

* :func:`select_device` — ``auto`` picks CUDA when available (the local rank's GPU under
  torchrun), else CPU.
* :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state` — Python, NumPy and
  torch (CPU + CUDA) generators, so a resumed run continues the exact random stream.
* :func:`autocast` / :func:`grad_scaler` — AMP (float16) on CUDA only; on CPU both are no-ops.
* :func:`init_distributed` — ``torch.distributed`` from the torchrun environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on CUDA, gloo on CPU.
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic ``torch.save`` (temp + rename;
  a full disk is reported as such, with the file and the space left).
"""

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.storage import atomic_path


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank information: from the initialised process group, else the torchrun env, else 0/1."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return dist_info().is_main


def cpu_threads(requested: int | None = None) -> int:
    """The CPU threads the pipeline may use: ``requested`` (the config's ``threads``) when
    set, else the cores this process may run on (its affinity mask, which ``taskset`` and
    cgroup cpusets narrow; ``os.cpu_count()`` where there is none)."""
    if requested:
        return int(requested)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        return os.cpu_count() or 1


def apply_threads(requested: int | None) -> None:
    """``torch.set_num_threads(requested)`` when set; else torch's default stays."""
    if requested:
        torch.set_num_threads(int(requested))


def select_device(preference: str = "auto") -> torch.device:
    """``cpu``, ``cuda`` (error when absent) or ``auto``."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    index = dist_info().local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (idempotent)."""
    info = dist_info()
    if info.distributed and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info = dist_info()
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when a process group is running, else the model itself.

    ``find_unused_parameters`` stays off (it costs a graph traversal per step): every
    registered segmentor uses all its parameters in its training loss (the segmentor tests
    assert it), and the classifier always builds its contrastive term, weighting it 0 when
    it is off."""
    if dist.is_available() and dist.is_initialized():
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


# --------------------------------------------------------------------------- mixed precision
def amp_enabled(device: torch.device, requested: bool) -> bool:
    return bool(requested) and device.type == "cuda"


def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA when enabled; a null context otherwise."""
    if amp_enabled(device, enabled):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=amp_enabled(device, enabled))


# --------------------------------------------------------------------------- checkpoints
class _RecordingWriter:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write: torch turns
    it into ``RuntimeError: ... unexpected pos`` and loses the errno."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file then rename: a kill never leaves a torn checkpoint; a full
    disk raises :class:`~pipeline.errors.DiskFullError` naming the file and the space left."""
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save(state, writer)
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from None
