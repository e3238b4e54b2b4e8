"""Building the config: defaults < a YAML/JSON file < a GRU4Rec-only file < ``--set section.name=value``.

Every value is coerced to its setting's type and checked by its section (pipeline.config.sections) here,
when the config is built; an error names the setting and where its value came from (the file or the --set).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config.sections import GRU4RecConfig, PipelineConfig, SettingError, grid_points
from pipeline.errors import ConfigError

T = TypeVar("T")
Origins = dict[str, str]  # dotted setting name -> where its value came from ("config file X", "--set a.b=1")


def _coerce(value: Any, tp: Any, where: str) -> Any:  # noqa: C901, PLR0911 - one branch per setting type
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(v, args[0], where) for v in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            try:
                return int(str(value))
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def _source(origins: Origins | None, *names: str) -> str:
    """`` (from <where>)`` for the first of ``names`` (or a setting inside it) that has a known origin."""
    for name in names:
        for key, where in (origins or {}).items():
            if key == name or key.startswith(name + "."):
                return f" (from {where})"
    return ""


def _unknown(cls: type, unknown: list[str], known: set[str], where: str, origins: Origins | None) -> ConfigError:
    message = f"unknown setting(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(known))}"
    if cls is PipelineConfig:  # a section's setting given without its section (e.g. a flat GRU4Rec name)
        sections = typing.get_type_hints(PipelineConfig).items()
        hints = [f"{name}.{k}" for k in unknown for name, tp in sections if k in {f.name for f in fields(tp)}]
        if hints:
            message += f"; settings are named section.name, did you mean {', '.join(hints)}?"
    return ConfigError(message + _source(origins, *(where + k for k in unknown)))


def from_mapping(cls: type[T], mapping: dict[str, Any], where: str = "", origins: Origins | None = None) -> T:
    """Build a (nested) config dataclass from a plain mapping, naming any unknown key or bad value.

    ``origins`` (dotted name -> file or --set) lets an error say where the bad value came from.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise _unknown(cls, unknown, known, where, origins)
    kwargs: dict[str, Any] = {}
    for name, value in mapping.items():
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a section (mapping), got {value!r}" + _source(origins, where + name))
            kwargs[name] = from_mapping(tp, value, f"{where}{name}.", origins)  # type: ignore[arg-type]
        else:
            try:
                kwargs[name] = _coerce(value, tp, f"{where}{name}")
            except ConfigError as exc:
                raise ConfigError(f"{exc}{_source(origins, where + name)}") from None
    try:
        return cls(**kwargs)
    except SettingError as exc:
        raise SettingError(f"{exc}{_source(origins, *(where + s for s in exc.settings))}", exc.settings) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a mapping (an error names the file when it is not one)."""
    import yaml  # only when a file is read: keeps `python -m pipeline --help` fast

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of setting names to values")
    return data


def _parse_one(item: str) -> tuple[list[str], Any]:
    import yaml  # only when there are overrides: keeps `python -m pipeline --help` fast

    if "=" not in item:
        raise ConfigError(f"--set expects name=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def parse_overrides(items: list[str] | None, origins: Origins | None = None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c.d=[100,100]"]`` into a nested mapping; values are parsed as YAML scalars/lists.

    With ``origins``, each dotted name is recorded as coming from its ``--set``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        parts, value = _parse_one(item)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        if origins is not None:
            origins[".".join(parts)] = f"--set {item}"
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _record(mapping: dict[str, Any], where: str, origins: Origins, prefix: str = "") -> None:
    """Note ``where`` as the origin of every setting in ``mapping`` (sections: one level down)."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if not prefix and isinstance(value, dict):
            _record(value, where, origins, f"{name}.")
        else:
            origins[name] = where


def _gru4rec_file(path: str | Path) -> dict[str, Any]:
    """A GRU4Rec-only file: published parameter names at the top level (or under a ``gru4rec:`` section)."""
    mapping = read_config_file(path)
    if "gru4rec" in mapping and isinstance(mapping["gru4rec"], dict):
        mapping = mapping["gru4rec"]
    return mapping


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, gru4rec_file: str | Path | None = None
) -> PipelineConfig:
    """The pipeline config from defaults, an optional file, an optional GRU4Rec-only file and ``--set`` overrides.

    Every value is checked here; an error names the setting and the file or ``--set`` it came from.
    """
    origins: Origins = {}
    mapping: dict[str, Any] = {}
    if path:
        mapping = read_config_file(path)
        _record(mapping, f"config file {path}", origins)
    if gru4rec_file:
        flat = _gru4rec_file(gru4rec_file)
        _record({"gru4rec": flat}, f"GRU4Rec file {gru4rec_file}", origins)
        mapping = deep_merge(mapping, {"gru4rec": flat})
    mapping = deep_merge(mapping, parse_overrides(overrides, origins))
    cfg = from_mapping(PipelineConfig, mapping, origins=origins)
    _check_grid(cfg, origins)
    return cfg


def _check_grid(cfg: PipelineConfig, origins: Origins) -> None:
    """Every point of ``airflow.grid`` over the ``gru4rec`` section is a valid GRU4Rec config (a trial)."""
    try:
        for point in grid_points(cfg.airflow.grid):
            from_mapping(GRU4RecConfig, {**to_dict(cfg.gru4rec), **point}, "gru4rec.")
    except ConfigError as exc:
        raise ConfigError(f"airflow.grid: {exc}{_source(origins, 'airflow.grid')}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of any config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
