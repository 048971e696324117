"""Configs as text: YAML files and `section.key=value` overrides -> `Config`, and back
(`config_yaml`, `flax-gpt config --explain`).

Resolution order for every section: dataclass defaults < preset (model/optim only) < YAML file
< command-line overrides. The resolved config is what gets saved to `RUN_DIR/config.yaml`, so a
saved config always reloads to exactly the same values. An unknown key is an error naming the
closest valid one; each value is then checked against its field's declaration (type, range, choices)
and typed by `Config.validate()`, so a file, an override and a `Config` built in code meet one check.
A YAML document is read strictly: a key given twice, or a file that is not UTF-8, is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from flax_gpt.config import PRESETS, RESULT, SECTIONS, Config
from flax_gpt.errors import ConfigError


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without its base-60 numbers, so `train.profile_steps=2:4` stays "2:4" (not 124), and
    without silently keeping the last of a key given twice."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        return "tag:yaml.org,2002:str" if ":" in str(value) and tag.endswith((":int", ":float")) else tag

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` is overridden on purpose; a non-scalar key fails in YAML's own check
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one of them",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} is not section.key=value (e.g. train.steps=20)")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:  # YAML scalars: numbers, true/false, lists, quoted strings ("{title}\n{abstract}")
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # anything else is taken as the plain string it is
    if isinstance(value, dict):  # no setting takes a mapping: {abstract} is a template's text
        value = raw
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
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                options = [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
                raise ConfigError(f"unknown config key '{name}.{key}'{_closest(f'{name}.{key}', options)}")
        if name in PRESETS:
            preset = values.get("preset", cls.preset)
            if not isinstance(preset, str) or preset not in PRESETS[name]:
                raise ConfigError(f"{name}.preset={preset!r} is not one of {', '.join(PRESETS[name])}")
            values = {**PRESETS[name][preset], **values}
        sections[name] = cls(**values)  # as given: validate() checks and types every value
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
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}, line {line}); "
                          "save it as UTF-8") from None
    return config_from_yaml(text, f"config file {p}", overrides)


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
        choices += f"; valid: {f.metadata['valid']}" if f.metadata["valid"] else ""
        effect = "result" if f.metadata["effect"] == RESULT else "run   "
        lines.append(f"{name:<30} {shown:<22} {effect}  {f.metadata['doc']}{choices}{note}")
    head = ("key                            value                  effect  meaning\n"
            "(effect: 'result' changes what a run computes, so a run directory refuses a change on resume; "
            "'run' changes only how it runs)")
    return head + "\n" + "\n".join(lines)
