"""The configuration reference (``docs/configuration.md``), generated from the pydantic models.

``wsss config --reference > docs/configuration.md`` writes it; ``tests/test_config_docs.py``
regenerates it and fails when the committed file differs, so the reference follows
``pipeline/config.py``. One table per model (section), one row per field: the dotted name,
the type with its bounds, the default, where the presets differ, and the field's description.
"""

import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import PRESETS, PipelineConfig, config_to_dict, flatten, preset

REGENERATE = "wsss config --reference > docs/configuration.md"

INTRO = f"""# Configuration reference

<!-- generated from pipeline/config.py by `{REGENERATE}`; do not edit by hand -->

`pipeline/config.py` holds one pydantic model per stage and one for the whole pipeline, with
the presets {', '.join(f'`{p}`' for p in PRESETS)}. Every command takes `--config` (a preset
name, or a YAML/JSON file that may start from a preset with `preset: voc`) and repeated dotted
overrides; unknown keys, wrong types and out-of-range values are refused with the field path
before any work starts:

```bash
.venv/bin/wsss config --config voc --set crf.iterations=5 --set segmentor.models='[sanet, ocrnet]'
```

A description starting with *not in key* marks a field that is part of no stage's cache key
(it says how or where a stage runs, not what it computes): changing it reuses the outputs.
"""

_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
           ("max_length", "length ≤"))


def type_name(annotation: Any) -> str:
    """A readable type: ``Literal['a', 'b']`` -> ``a | b``, ``Optional[int]`` -> ``int | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is Path:
        return "path"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's numeric / length constraints, e.g. ``≥ 1, ≤ 20``."""
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:.4g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(out)


def _json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = config_to_dict(value)
    return json.dumps(value, default=str, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(field: FieldInfo) -> Any:
    return field.default_factory() if field.default_factory is not None else field.default


def _preset_values() -> dict[str, dict[str, Any]]:
    return {name: flatten(config_to_dict(preset(name))) for name in PRESETS}


def _presets_cell(dotted: str, default: Any, presets: dict[str, dict[str, Any]]) -> str:
    plain = json.loads(_json(default))
    differing = [f"{name}: `{_cell(_json(values[dotted]))}`" for name, values in presets.items()
                 if dotted in values and values[dotted] != plain]
    return "; ".join(differing)


def _models(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted prefix, model) for the model and every nested model, depth first."""
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.extend(_models(field.annotation, f"{prefix}{name}."))
    return out


def in_key(dotted: str, key_prefixes: set[str]) -> bool:
    """Whether a field is part of a stage key: it is one of ``key_prefixes`` or lies below one."""
    return any(dotted == p or dotted.startswith(p + ".") for p in key_prefixes)


def section(prefix: str, model: type[BaseModel], presets: dict[str, dict[str, Any]],
            key_prefixes: set[str]) -> str:
    """One model as a heading, its docstring and a table of its plain (non-model) fields."""
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    doc = inspect.cleandoc(model.__doc__ or "")
    rows = ["| field | type | default | presets | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            continue
        dotted = prefix + name
        kind = type_name(field.annotation)
        limits = bounds(field)
        kind = f"{kind} ({limits})" if limits else kind
        desc = _cell(field.description or "")
        if not in_key(dotted, key_prefixes):
            desc = f"*not in key* — {desc}" if desc else "*not in key*"
        default = _default(field)
        rows.append(f"| `{dotted}` | {kind} | `{_cell(_json(default))}` | "
                    f"{_presets_cell(dotted, default, presets)} | {desc} |")
    return f"## {title} — {model.__name__}\n\n{doc}\n\n" + "\n".join(rows) + "\n"


def reference(key_prefixes: set[str]) -> str:
    """The whole of ``docs/configuration.md``. ``key_prefixes``: the dotted fields (or
    sections) the stage keys hash (``stages.stage_config``; passed in, as ``pipeline`` does
    not import ``stages``)."""
    presets = _preset_values()
    parts = [INTRO] + [section(prefix, model, presets, key_prefixes)
                       for prefix, model in _models(PipelineConfig)]
    return "\n".join(parts)
