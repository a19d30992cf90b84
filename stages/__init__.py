"""The five pipeline stages and the plain (Prefect-free) runner that chains them.

Each stage module exposes::

    NAME = "<stage>"
    def run(config: PipelineConfig, upstream: Mapping[str, StageResult], out_dir: Path,
            tracker: Tracker = NULL_TRACKER) -> StageResult

``run`` writes its files into ``out_dir`` (resumably: finished items already there are
skipped) and returns a :class:`~pipeline.storage.StageResult` with its headline metrics.
The runner here owns the bookkeeping around it: the provenance key and output directory,
the stage lock (:func:`pipeline.storage.stage_lock`: two runs with the same config wait for
each other), cache hits, the manifest and the completion marker (written last). ``wsss run``
calls :func:`run_pipeline`; the Prefect flow calls :func:`run_stage` from one task per stage
and adds nothing else.
"""

import contextlib
import importlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline.config import PipelineConfig, config_to_dict
from pipeline.errors import InputError
from pipeline.storage import (StageResult, canonical_json, clean_temp_files, code_version,
                              finish_stage, hash_text, is_complete, provenance_key, read_manifest,
                              stage_dir, stage_lock)
from pipeline.tracking import NULL_TRACKER, Tracker


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    sections: tuple[str, ...]      # config sections that determine the output
    upstream: tuple[str, ...]      # stages whose outputs it reads


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("train_classifier", "stages.train_classifier", ("seed", "data", "classifier"), ()),
    StageSpec("generate_cams", "stages.generate_cams", ("seed", "data", "maps"), ("train_classifier",)),
    StageSpec("refine_crf", "stages.refine_crf", ("data", "crf"), ("generate_cams",)),
    StageSpec("train_segmentor", "stages.train_segmentor", ("seed", "data", "segmentor"), ("refine_crf",)),
    StageSpec("evaluate", "stages.evaluate", ("data", "evaluation"),
              ("generate_cams", "refine_crf", "train_segmentor")),
)}
STAGE_ORDER = tuple(STAGES)


def check_stage_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise InputError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGE_ORDER)}")
    return [n for n in STAGE_ORDER if n in names]


# fields that say how a stage runs, not what it produces: left out of the provenance key so
# that e.g. a killed CRF stage can be resumed with another worker count
EXECUTION_FIELDS: dict[str, tuple[str, ...]] = {
    "classifier": ("num_workers", "log_every", "feature_cache_mb"),
    "maps": ("workers",),
    "crf": ("workers", "chunk_size", "dask_address"),
    "segmentor": ("num_workers", "log_every", "parallel"),
}


def stage_config(config: PipelineConfig, name: str) -> dict[str, Any]:
    """The part of the config that determines a stage's output."""
    full = config_to_dict(config)
    part = {}
    for section in STAGES[name].sections:
        value = full[section]
        if isinstance(value, dict) and section in EXECUTION_FIELDS:
            value = {k: v for k, v in value.items() if k not in EXECUTION_FIELDS[section]}
        part[section] = value
    return part


def stage_key(config: PipelineConfig, name: str, upstream_keys: Mapping[str, str]) -> str:
    spec = STAGES[name]
    missing = [u for u in spec.upstream if u not in upstream_keys]
    if missing:
        raise ValueError(f"stage {name} needs the key of {', '.join(missing)}")
    return provenance_key(stage_config(config, name), {u: upstream_keys[u] for u in spec.upstream},
                          code_version([spec.module]))


def _cached_result(name: str, out_dir: Path) -> StageResult:
    manifest = read_manifest(out_dir)
    return StageResult(stage=name, key=out_dir.name, path=str(out_dir),
                       metrics=manifest.get("metrics", {}), files=manifest.get("files", {}),
                       run_id=manifest.get("run_id"), cached=True,
                       duration_s=manifest.get("duration_s", 0.0))


def torchrun_follower() -> bool:
    """True in ranks 1.. of a torchrun job (``WORLD_SIZE > 1``, ``RANK > 0``), read from the
    environment torchrun sets (no torch import)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


def run_stage(name: str, config: PipelineConfig, upstream: Mapping[str, StageResult],
              tracker: Tracker = NULL_TRACKER, force: bool = False,
              say: Callable[[str], None] | None = None) -> StageResult:
    """Run one stage, or return its stored result when an identical one is complete.

    ``force`` deletes an existing output of the same key first. An interrupted output
    (no completion marker) is resumed: its finished files are kept and skipped by the stage.
    Everything happens under the stage's lock, so a second run with the same config waits
    (``say`` reports the wait) and then finds the output complete.
    """
    spec = STAGES[name]
    key = stage_key(config, name, {u: upstream[u].key for u in spec.upstream if u in upstream})
    out_dir = stage_dir(config.workdir, name, key)
    # the ranks of one torchrun job are one run: rank 0 holds the lock and writes the marker
    lock = contextlib.nullcontext() if torchrun_follower() else stage_lock(config.workdir, name, key, say=say)
    with lock:
        if force and out_dir.exists():
            shutil.rmtree(out_dir)
        if is_complete(out_dir):
            return _cached_result(name, out_dir)
        return _compute(name, config, upstream, key, out_dir, tracker)


def _compute(name: str, config: PipelineConfig, upstream: Mapping[str, StageResult], key: str,
             out_dir: Path, tracker: Tracker) -> StageResult:
    """Run the stage module into ``out_dir``, then write the manifest and the marker."""
    spec = STAGES[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out_dir)
    module = importlib.import_module(spec.module)
    from pipeline.runtime import apply_threads  # torch, which the stage module just imported

    apply_threads(config.threads)
    start = time.time()
    result: StageResult = module.run(config, upstream, out_dir, tracker)
    result.duration_s = time.time() - start
    result.key, result.path, result.stage, result.cached = key, str(out_dir), name, False
    result.run_id = result.run_id or tracker.run_id
    if torchrun_follower():
        return result
    finish_stage(out_dir, {
        "stage": name, "key": key, "config": stage_config(config, name),
        "inputs": {u: upstream[u].key for u in spec.upstream},
        "metrics": result.metrics, "files": result.files, "run_id": result.run_id,
        "duration_s": result.duration_s,
        "file_count": sum(1 for p in out_dir.rglob("*") if p.is_file()),
    })
    return result


def needed_stages(selected: Iterable[str]) -> list[str]:
    """The selected stages plus every stage they depend on, in pipeline order."""
    needed = set(check_stage_names(selected))
    for name in reversed(STAGE_ORDER):
        if name in needed:
            needed.update(STAGES[name].upstream)
    return [name for name in STAGE_ORDER if name in needed]


def splits_read(config: PipelineConfig, name: str) -> tuple[str, ...]:
    """The dataset splits stage ``name`` reads (stage 5: the segmentor split, then the split
    its maps and pseudo-masks are scored on, as ``stages.evaluate.scored_train_split``)."""
    maps_split = config.maps.split or config.data.train_split
    return {
        "train_classifier": (config.data.train_split,),
        "generate_cams": (maps_split,),
        "refine_crf": (maps_split,),
        "train_segmentor": (config.data.train_split,),
        "evaluate": (config.evaluation.split or config.data.val_split,
                     config.evaluation.train_split or maps_split),
    }[name]


def stages_to_compute(config: PipelineConfig, selected: Iterable[str], force: bool = False) -> list[str]:
    """The stages a run of ``selected`` will compute: those of the plan whose output is not
    complete, plus the selected ones under ``force`` (keys need no outputs, so this is exact
    before anything runs)."""
    selected = set(check_stage_names(selected))
    keys: dict[str, str] = {}
    todo = []
    for name in needed_stages(selected):
        keys[name] = stage_key(config, name, {u: keys[u] for u in STAGES[name].upstream})
        if (force and name in selected) or not is_complete(stage_dir(config.workdir, name, keys[name])):
            todo.append(name)
    return todo


def check_run_inputs(config: PipelineConfig, selected: Iterable[str] | None = None,
                     force: bool = False, decode: bool = False) -> list[str]:
    """Before any compute: every file of every split the run will read exists and its header
    opens (images and masks, mask sizes equal to the image sizes); ``decode`` reads every file
    in full instead (``wsss data info``'s check: truncated files, mask values). Raises
    :class:`pipeline.data.DatasetError` naming the file; returns the splits checked.
    Synthetic data is generated here when missing (under a lock: concurrent runs share it)."""
    from pipeline.data import build_dataset

    todo = stages_to_compute(config, selected if selected is not None else STAGE_ORDER, force)
    splits = list(dict.fromkeys(split for name in todo for split in splits_read(config, name)))
    if not splits:
        return []
    with stage_lock(config.workdir, "dataset", hash_text(canonical_json(config_to_dict(config.data)))):
        datasets = [build_dataset(config.data, split) for split in splits]   # files exist
    for dataset in datasets:
        if decode:
            dataset.validate()
        else:
            dataset.check_headers()
    return splits


def run_pipeline(config: PipelineConfig, stages: Iterable[str] | None = None, force: bool = False,
                 tracker: Tracker = NULL_TRACKER,
                 on_result: Callable[[StageResult], None] | None = None,
                 say: Callable[[str], None] | None = None,
                 on_start: Callable[[str, Path, bool, Tracker], Tracker] | None = None,
                 ) -> dict[str, StageResult]:
    """Run the selected stages in order (default: all). Stages a selected stage depends on
    but that were not selected are reused when complete and computed otherwise; ``force``
    applies to the selected stages only; ``say`` reports waits for a stage lock.
    ``on_start(name, out_dir, will_reuse, tracker)`` is called before each stage and returns
    the tracker the stage logs to (e.g. ``tracker`` wrapped to show progress); ``on_result``
    gets each result."""
    selected = set(check_stage_names(stages if stages is not None else STAGE_ORDER))
    results: dict[str, StageResult] = {}
    for name in needed_stages(selected):
        inputs = {u: results[u] for u in STAGES[name].upstream}
        stage_force = force and name in selected
        stage_tracker = tracker.child(name)
        if on_start:
            out_dir = stage_dir(config.workdir, name,
                                stage_key(config, name, {u: r.key for u, r in inputs.items()}))
            stage_tracker = on_start(name, out_dir, is_complete(out_dir) and not stage_force, stage_tracker)
        results[name] = run_stage(name, config, inputs, stage_tracker, force=stage_force, say=say)
        if on_result:
            on_result(results[name])
    return results
