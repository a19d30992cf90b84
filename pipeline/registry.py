"""Names of the registered segmentors, read from the source of ``models/segmentors``.

The registry itself (:func:`models.segmentors.available`) imports every architecture and
torch, seconds the config validation must not pay: a config naming an unknown segmentor is
refused when it is loaded, before ``wsss run`` imports torch. The names are the string
arguments of the ``@register("<name>")`` decorators in the package's modules; a test checks
they equal the imported registry.
"""

import ast
import functools
import importlib.util
from pathlib import Path

SEGMENTOR_PACKAGE = "models.segmentors"


def _package_dir() -> Path:
    spec = importlib.util.find_spec(SEGMENTOR_PACKAGE.split(".")[0])   # imports nothing
    base = Path(next(iter(spec.submodule_search_locations)))
    return base.joinpath(*SEGMENTOR_PACKAGE.split(".")[1:])


def _registered(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register"
                        and deco.args and isinstance(deco.args[0], ast.Constant)):
                    names.append(deco.args[0].value)
    return names


@functools.lru_cache(maxsize=1)
def segmentor_names() -> tuple[str, ...]:
    """Sorted names of the segmentors ``models.segmentors`` registers (without importing it)."""
    files = [p for p in sorted(_package_dir().glob("*.py")) if not p.name.startswith("_")]
    return tuple(sorted(name for path in files for name in _registered(path)))
