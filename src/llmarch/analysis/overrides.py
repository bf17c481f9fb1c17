"""What-ifs: ``--set field=value`` applied to a configuration.

``--set`` takes a ``ModelConfig`` field name, or a dotted path into a sub-config
(``moe.top_k``, ``mla.kv_lora_rank``, ``rope.theta``), and a value parsed as JSON where it parses
(``4096``, ``null``, ``true``, ``["full"]``) and as a plain string otherwise (``mha``). A per-layer
list is repeated as a pattern and cut to ``num_layers``, the way Gemma writes its schedule:
``layer_types=["sliding","full"]`` is Gemma 2's 1:1 alternation on any depth, and
``num_layers=12`` keeps the first 12 entries of each per-layer list.
Setting a field of an absent sub-config (``moe.top_k`` on a dense model) starts from that
sub-config's defaults. The result is validated like any configuration.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from ..errors import ConfigError
from ..model.config import MLAConfig, ModelConfig, MoEConfig, RopeConfig

SUB_CONFIGS: dict[str, type] = {"moe": MoEConfig, "mla": MLAConfig, "rope": RopeConfig, "rope_local": RopeConfig}
PER_LAYER = ("layer_types", "rope_layers", "moe_layers", "intermediate_sizes", "activation_sparsity")


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"moe.top_k=2"`` -> (["moe", "top_k"], 2)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set expects field=value (e.g. --set sliding_window=4096 or --set moe.top_k=2), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip().split("."), value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field's annotated type (int where a float is wanted is fine)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict) or value is None
    return isinstance(value, tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(cls: type, path: list[str], name: str, value: Any) -> None:
    types = _field_types(cls)
    where = ".".join(path[:-1])
    if name not in types:
        known = ", ".join(sorted(types))
        raise ConfigError(f"--set {'.'.join(path)}: {where + ' has' if where else 'ModelConfig has'} no field "
                          f"{name!r}; known fields: {known}")
    if not _matches(value, types[name]):
        raise ConfigError(f"--set {'.'.join(path)}: expected {_type_name(types[name])}, got {json.dumps(value)} "
                          f"({type(value).__name__}); write the value as JSON, e.g. 4096, null, true, [\"full\"]")


def _fit(value: list, n: int) -> list:
    """A per-layer list repeated as a pattern, or cut, to ``n`` layers."""
    return [value[i % len(value)] for i in range(n)] if value else value


def apply(cfg: ModelConfig, assignments: list[str]) -> ModelConfig:
    """``cfg`` with each ``field=value`` applied in order, validated; its name says what changed."""
    if not assignments:
        return cfg
    d = cfg.to_dict()
    for text in assignments:
        path, value = parse_assignment(text)
        if len(path) == 1:
            _check(ModelConfig, path, path[0], value)
            d[path[0]] = value
        elif len(path) == 2 and path[0] in SUB_CONFIGS:
            cls = SUB_CONFIGS[path[0]]
            _check(cls, path, path[1], value)
            sub = d.get(path[0]) or dataclasses.asdict(cls())
            d[path[0]] = {**sub, path[1]: value}
        else:
            raise ConfigError(f"--set {'.'.join(path)}: dotted paths reach one level into "
                              f"{', '.join(SUB_CONFIGS)} (e.g. moe.top_k); {path[0]!r} is not one of them")
    for key in PER_LAYER:
        if isinstance(d.get(key), list):
            d[key] = _fit(d[key], d["num_layers"])
    d["name"] = f"{cfg.name or 'model'} [{', '.join(assignments)}]"
    return ModelConfig.from_dict(d).validate()
