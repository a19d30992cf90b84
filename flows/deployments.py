"""The deployments of the flow ``wsss`` (``prefect.yaml`` at the project root).

``prefect.yaml`` is generated from the presets in :mod:`pipeline.config` so the two cannot
disagree: ``wsss deployments --write`` rewrites it, ``wsss deployments --check`` (and a test)
fails when it is stale. Three deployments on the ``process`` work pool ``wsss-process``:

* ``voc``  — PASCAL VOC 2012 + SBD, paper settings (pass another ``data.root`` with
  ``wsss submit voc --set data.root=/data/VOCdevkit/VOC2012``);
* ``coco`` — MS COCO 2014;
* ``demo`` — the embedded synthetic dataset, CPU-sized.

Each stores the whole preset as its ``config`` parameter (Prefect merges run parameters
shallowly, so a run always carries a complete, validated config). There is no ``pull``
section: ``prefect deploy``, run from the project root, records a ``set_working_directory``
step pointing there, which is where relative work directories (``work/demo``) resolve.
"""

from pathlib import Path
from typing import Any

import yaml

from flows.paths import PREFECT_YAML
from flows.services import POOL
from pipeline.config import PRESETS, config_to_dict, preset

ENTRYPOINT = "flows/wsss.py:wsss"
DESCRIPTIONS = {
    "voc": "PASCAL VOC 2012 + SBD (train_aug), paper settings. Set config.data.root to your VOC2012 directory.",
    "coco": "MS COCO 2014 (80 classes), paper settings. Set config.data.root to your COCO root.",
    "demo": "The embedded synthetic dataset, sized for 2 CPU cores (a few minutes).",
    "voc-mini": "530 real VOC 2012 photos (wsss data prepare voc-mini), pretrained EfficientNet-Lite0, "
                "sized for 2 CPU cores (about 30 minutes).",
}
HEADER = (
    "# Deployments of the Prefect flow `wsss` (GENERATED from the presets in pipeline/config.py:\n"
    "# run `wsss deployments --write` after changing a preset). Deploy with `prefect deploy --all`\n"
    "# from this directory, with the services of `wsss up` running (`wsss demo` does all of it).\n"
)


def deployment_spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "entrypoint": ENTRYPOINT,
        "description": DESCRIPTIONS[name],
        "tags": ["wsss", name],
        "parameters": {"config": config_to_dict(preset(name))},
        "work_pool": {"name": POOL, "work_queue_name": None, "job_variables": {}},
        "schedules": [],
    }


def project_spec() -> dict[str, Any]:
    return {
        "name": "wsss",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        "deployments": [deployment_spec(name) for name in PRESETS],
    }


def render() -> str:
    return HEADER + yaml.safe_dump(project_spec(), sort_keys=False, default_flow_style=False, width=100)


def write(root: Path) -> Path:
    from pipeline.storage import atomic_write_text

    path = Path(root) / PREFECT_YAML
    atomic_write_text(path, render())
    return path


def stale(root: Path) -> list[str]:
    """Names of the deployments whose stored parameters differ from the presets (or ``[file]``
    when prefect.yaml is missing or unreadable)."""
    path = Path(root) / PREFECT_YAML
    try:
        current = yaml.safe_load(path.read_text())
        stored = {d["name"]: d for d in current["deployments"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return [str(path)]
    return [name for name in PRESETS if stored.get(name) != deployment_spec(name)]
