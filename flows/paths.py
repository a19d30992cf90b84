"""Where the project lives: the project root (the directory holding ``prefect.yaml``) and its
work directory ``work/`` (services, MLflow store, stage outputs of the presets).

* project root: the current directory when it holds ``prefect.yaml``, else the checkout this
  package was installed from (editable install), else the current directory.
* work directory ("home"): ``$WSSS_HOME`` when set, else ``<project root>/work``.

The services started by ``wsss up`` export ``WSSS_HOME`` and run with the project root as
their working directory, and ``prefect deploy`` (run from the project root) records a
``set_working_directory`` pull step, so a flow run on the worker resolves the relative
``workdir`` of a config (``work/demo``) exactly as ``wsss run`` does from the project root.
"""

import os
from pathlib import Path

PREFECT_YAML = "prefect.yaml"


def project_root() -> Path:
    cwd = Path.cwd().resolve()
    if (cwd / PREFECT_YAML).is_file():
        return cwd
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / PREFECT_YAML).is_file():
        return checkout
    return cwd


def home() -> Path:
    """The project's work directory (absolute)."""
    env = os.environ.get("WSSS_HOME")
    return Path(env).resolve() if env else project_root() / "work"


def resolve_workdir(workdir: Path, root: Path | None = None) -> Path:
    """A config's ``workdir`` as an absolute path (relative ones against ``root``, default cwd)."""
    workdir = Path(workdir)
    return workdir if workdir.is_absolute() else (root or Path.cwd()).resolve() / workdir
