"""Run configurations: the flat keys users write, read into a typed :class:`RunConfig`.

A configuration starts from :data:`DEFAULTS`, then a preset shipped in ``ebflow/experiment/config/presets/``
(or a user YAML file, which may name a ``preset`` to start from), then the preset's ``per_loss`` entry
for the chosen loss, then ``key=value`` overrides. :func:`resolve_config` validates the result
once (:func:`~ebflow.experiment.config.schema.validate_config`: unknown keys and out-of-range values
raise :class:`~ebflow.errors.ConfigError` naming the key) and returns a :class:`RunConfig`, whose
sections the application reads (``config.optim.lr``). YAML is read with ``yaml.safe_load`` only.

The keys, their checks and :class:`RunConfig` are :mod:`ebflow.experiment.config.schema`; this
module reads presets, files and overrides.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ...errors import ConfigError
from .schema import (
    DEFAULTS,
    FIELDS,
    RunConfig,
    coerce_value,
    unknown_key,
    validate_config,
)

__all__ = [
    "apply_per_loss",
    "dump_config",
    "list_presets",
    "load_config",
    "load_preset",
    "parse_overrides",
    "resolve_config",
]


# -- presets and files ---------------------------------------------------------------------------
def _preset_dir() -> Any:
    return resources.files(__package__) / "presets"  # ebflow.experiment.config


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description, in a stable order."""
    out: dict[str, str] = {}
    for entry in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = _read_yaml_text(entry.read_text(encoding="utf-8"), entry.name)
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
        ) from err
    except OSError as err:
        raise ConfigError(f"cannot read {where}: {err.strerror or err}") from err


def _read_yaml_text(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """The raw key/value mapping of a shipped preset."""
    entry = _preset_dir() / f"{name}.yaml"
    if not entry.is_file():
        names = list(list_presets())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint} (presets: {', '.join(names)}; or a YAML file path)")
    data = _read_yaml_text(entry.read_text(encoding="utf-8"), f"preset {name!r}")
    data.setdefault("name", name)
    return data


def load_config(name_or_file: str) -> dict[str, Any]:
    """Raw mapping of a preset name or a YAML file; a file may say ``preset: NAME`` to extend one."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        where = f"config file {str(path)!r}"
        data = _read_yaml_text(_read_text(path, where), where)
        base = data.pop("preset", None)
        if base is not None:
            merged = load_preset(str(base))
            merged.update(data)
            return merged
        return data
    return load_preset(name_or_file)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``true``, ``null``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in FIELDS:
            raise unknown_key(key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"cannot read the value of config key {key!r}: {raw!r} "
                f"({getattr(err, 'problem', None) or err})"
            ) from err
        if FIELDS[key].types == (str,) and value is not None and not isinstance(value, str):
            value = raw.strip()  # e.g. data_dir=2024 stays a string
        out[key] = coerce_value(key, value) if value is not None else value
    return out


def apply_per_loss(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``raw`` with its ``per_loss`` entry for the chosen loss applied, except for the keys that
    ``overrides`` sets explicitly (those win)."""
    out = dict(raw)
    out.update(overrides or {})
    table = out.get("per_loss") or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"config key 'per_loss' must be a mapping loss -> {{key: value}}, got {table!r}")
    entry = table.get(out.get("loss", DEFAULTS["loss"])) or {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"config key 'per_loss' entry for {out.get('loss')!r} must be a mapping")
    for key, value in entry.items():
        if key not in FIELDS:
            raise unknown_key(str(key))
        if key not in (overrides or {}):
            out[key] = value
    return out


def resolve_config(name_or_file: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the preset/file, then its ``per_loss`` entry for the chosen loss, then the
    overrides; validated into a :class:`RunConfig`."""
    raw = load_config(name_or_file) if name_or_file else load_preset("digits-fc")
    return validate_config(apply_per_loss(raw, overrides))


def dump_config(config: RunConfig | Mapping[str, Any]) -> str:
    """YAML text of a config (flat keys, in schema order): what ``config.yaml`` holds."""
    flat = config.to_dict() if isinstance(config, RunConfig) else config
    ordered = {k: flat[k] for k in FIELDS if k in flat}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)
