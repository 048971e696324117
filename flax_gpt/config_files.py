"""Configs as text: YAML files and `section.key=value` overrides -> `Config`, and back
(`config_yaml`, `flax-gpt config --explain`).

Resolution order for every section: dataclass defaults < preset (model/optim only) < YAML file
< command-line overrides. The resolved config is what gets saved to `RUN_DIR/config.yaml`, so a
saved config always reloads to exactly the same values. Every value is turned into its field's
declared type here, and an unknown key is an error naming the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from flax_gpt.config import PRESETS, RESULT, SECTIONS, Config
from flax_gpt.errors import ConfigError


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(key: str, value: Any, typ: Any, legacy: dict) -> Any:
    """Turn a YAML/CLI value into the field's declared type (an older value into its present
    equivalent, as the field declares), or fail naming the key."""
    if isinstance(value, bool) and value in legacy:
        return legacy[value]
    if typ is Any or value is None:
        return value
    if typ is list or typing.get_origin(typ) is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(typ, types.UnionType):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects true/false (got {value!r})")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {typ.__name__} (got {value!r})") from None
    return value


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers, so `train.profile_steps=2:4` stays "2:4" (not 124)."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        return "tag:yaml.org,2002:str" if ":" in str(value) and tag.endswith((":int", ":float")) else tag


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not section.key=value (e.g. train.steps=20)")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:  # YAML scalars: numbers, true/false, lists, quoted strings ("{title}\n{abstract}")
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # anything else is taken as the plain string it is
    return section, key, value


def build_config(raw: dict[str, Any] | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Resolve a nested dict (as read from YAML) plus `section.key=value` overrides."""
    raw = dict(raw or {})
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{_closest(str(section), list(SECTIONS))}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys (got "
                              f"{type(values).__name__} {values!r}); write e.g. '{section}:' then 'key: value' lines")
    raw = {k: dict(v or {}) for k, v in raw.items()}
    for text in overrides:
        section, key, value = _parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{_closest(section, list(SECTIONS))}")
        raw.setdefault(section, {})[key] = value
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                options = [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
                raise ConfigError(f"unknown config key '{name}.{key}'{_closest(f'{name}.{key}', options)}")
        if name in PRESETS:
            preset = values.get("preset", cls.preset)
            if preset not in PRESETS[name]:
                raise ConfigError(f"{name}.preset={preset!r} is not one of {', '.join(PRESETS[name])}")
            values = {**PRESETS[name][preset], **values}
        legacy = {f.name: f.metadata.get("legacy", {}) for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: _coerce(f"{name}.{k}", v, hints[k], legacy[k]) for k, v in values.items()})
    return Config(**sections).validate()


def config_from_yaml(text: str, where: str, overrides: list[str] | tuple = ()) -> Config:
    """A YAML document (a config file, a run's config.yaml) plus overrides -> Config; `where` names it."""
    try:
        raw = _yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of sections (model:, data:, train: ...)")
    return build_config(raw, overrides)


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> Config:
    """Load a YAML config file (or only defaults when path is None) and apply overrides."""
    if path is None:
        return build_config({}, overrides)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; pass a YAML file such as configs/tiny.yaml")
    return config_from_yaml(p.read_text(encoding="utf-8"), f"config file {p}", overrides)


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def explain(config: Config) -> str:
    """`flax-gpt config --explain`: every key, its value here, its default, its effect and meaning."""
    default = Config()
    lines = []
    for name, section, f, value in config.items():
        base = getattr(getattr(default, section), f.name)
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        note = "" if value == base else f"  (default {base!r})"
        choices = f" [{' | '.join(f.metadata['choices'])}]" if f.metadata["choices"] else ""
        effect = "result" if f.metadata["effect"] == RESULT else "run   "
        lines.append(f"{name:<30} {shown:<22} {effect}  {f.metadata['doc']}{choices}{note}")
    head = ("key                            value                  effect  meaning\n"
            "(effect: 'result' changes what a run computes, so a run directory refuses a change on resume; "
            "'run' changes only how it runs)")
    return head + "\n" + "\n".join(lines)
