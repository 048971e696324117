"""Folders written for `datasets`: a `save_to_disk` folder, or a Hub dataset repo snapshot (a README
with a `configs:` block in its front matter, or a `data/` folder), and which of its files
`datasets.load_dataset(folder, name=..., split=...)` would read.

A README's `configs:` block is checked as `datasets` checks it (a list of mappings, each with a
`config_name`; `data_files` a pattern, a list of patterns, or a list of `{split, path}`), so a
malformed block is one line naming the README and the entry, not a traceback or a silent guess.
An entry without `data_files` reads its `data_dir` (or the folder) by the file-name layout, as
`datasets` does.
"""

from __future__ import annotations

import re

import yaml
from etils import epath

from flax_gpt import storage
from flax_gpt.data.readers import check_file, is_data_file
from flax_gpt.errors import DataError

SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test", "eval")


def is_saved_dataset(folder: epath.Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "state.json").exists() and (folder / "dataset_info.json").exists())


def readme_configs(folder: epath.Path) -> list[dict] | None:
    """The checked `configs:` block of a dataset repo's README front matter; None when it has none."""
    readme = folder / "README.md"
    if not readme.is_file():  # absent (or a FIFO, which would block the read)
        return None
    text = readme.read_bytes().decode("utf-8", "replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark else ""  # +2: 0-based, after the opening ---
        raise DataError(f"{readme}: its front matter is not valid YAML{where}; fix it, or point data.source "
                        "at the data files") from None
    except IndexError:
        return None
    configs = front.get("configs") if isinstance(front, dict) else None
    if not configs:  # absent or empty: `datasets` then reads the folder by its layout
        return None
    fix = ("fix the README's configs block (huggingface.co/docs/hub/datasets-manual-configuration) or point "
           "data.source at the data files")
    if not isinstance(configs, list):
        raise DataError(f"{readme}: `configs:` is {_kind(configs)}, not a list of configurations; {fix}")
    for i, entry in enumerate(configs, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("config_name"), str):
            what = "has no config_name" if isinstance(entry, dict) else f"is {_kind(entry)}"
            raise DataError(f"{readme}: `configs:` entry {i} {what}; each entry is a mapping with a "
                            f"config_name; {fix}")
        if "data_files" in entry and _split_patterns(entry["data_files"]) is None:
            raise DataError(f"{readme}: `configs:` entry {i} ({entry['config_name']!r}) has data_files "
                            f"{str(entry['data_files'])[:60]!r}: not a pattern, a list of patterns or a list of "
                            f"{{split, path}}; {fix}")
    return configs


def _kind(value) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "a mapping",
            list: "a list"}.get(type(value), type(value).__name__)


def _split_patterns(spec) -> list[tuple[str, list[str]]] | None:
    """[(split, [patterns])] of a config's data_files, or None when malformed or empty."""
    if isinstance(spec, str) and spec:
        return [("train", [spec])]
    if not isinstance(spec, list) or not spec:
        return None
    if all(isinstance(p, str) and p for p in spec):
        return [("train", list(spec))]
    out = []
    for e in spec:
        path = e.get("path") if isinstance(e, dict) else None
        paths = [path] if isinstance(path, str) else path
        if set(e if isinstance(e, dict) else ()) != {"split", "path"} or not isinstance(e["split"], str) or \
                not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            return None
        out.append((e["split"], paths))
    return out


def _data_files(folder: epath.Path) -> list[epath.Path]:
    out = []
    for p in storage.files_under(folder):
        rel = str(p)[len(str(folder)):].lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")) and is_data_file(p):
            out.append(p)
    return out


def _split_of(rel: str) -> str | None:
    for name in SPLIT_NAMES:
        if re.search(rf"(^|[-_./]){name}([-_./]|$)", rel):
            return name
    return None


def _layout_files(folder: epath.Path, split: str) -> list[epath.Path]:
    """A folder without data_files: splits by file and folder names (`train-*.csv`, `test/`...)."""
    files = _data_files(folder)
    rels = {f: str(f)[len(str(folder)):].lstrip("/") for f in files}
    named = {f: _split_of(rels[f]) for f in files}
    if all(s is None for s in named.values()):
        chosen = files if split == "train" else []
    else:
        chosen = [f for f in files if named[f] == split or (split == "validation" and named[f] in ("valid", "val",
                                                                                                    "dev"))]
    if not chosen:
        raise DataError(f"dataset folder {folder} has no data files for split {split!r} (found splits "
                        f"{sorted({s or 'train' for s in named.values()})}); set data.hf_split")
    return [check_file(f) for f in chosen]


def snapshot_files(folder: epath.Path, split: str, name: str = "") -> list[epath.Path]:
    """The files `datasets.load_dataset(folder, name=name, split=split)` would read."""
    split = split.split("[")[0]
    configs = readme_configs(folder)
    if not configs:
        return _layout_files(folder, split)
    chosen = next((c for c in configs if c["config_name"] == name), None) if name else \
        next((c for c in configs if c.get("default")), configs[0])
    if chosen is None:
        raise DataError(f"dataset folder {folder} has no configuration data.hf_name={name!r}; "
                        f"it has {[c['config_name'] for c in configs]}")
    if "data_files" not in chosen:
        return _layout_files(folder / chosen["data_dir"] if isinstance(chosen.get("data_dir"), str) else folder,
                             split)
    entries = _split_patterns(chosen["data_files"])
    patterns = [p for s, paths in entries if s == split for p in paths]
    if not patterns:
        raise DataError(f"dataset folder {folder} (configuration {chosen['config_name']!r}) has no split "
                        f"{split!r}; it has {[s for s, _ in entries]}; set data.hf_split")
    files = [f for pattern in patterns for f in sorted(folder.glob(pattern))]
    if not files:
        raise DataError(f"dataset folder {folder}: the README's data_files for split {split!r} match no files")
    return [check_file(f) for f in files]
