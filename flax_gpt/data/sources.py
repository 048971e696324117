"""Where documents come from, read as a stream of bounded batches: local or bucket files, dataset
folders, a Hub dataset, or the synthetic generator.

`data.source` is resolved in this order:
  1. "synthetic"                       -> the seeded generator (`synthetic.py`)
  2. a folder written by `datasets`:   a `save_to_disk` folder (dataset_info.json + state.json, or
     dataset_dict.json) -> `datasets.load_from_disk`, memory-mapped; a Hub dataset repo snapshot
     (README.md with a `configs:` block, or a `data/` folder) -> its data files for `data.hf_name`
     and `data.hf_split`, as `datasets.load_dataset(folder)` picks them
  3. an existing path, folder of files or glob, local or a URL such as gs://bucket/dir/*.parquet
     (a str or a list of them)          -> those files
  4. a Hub dataset id, with or without an owner (`imdb`, `wikitext`, `owner/name`), that names no
     local path (`hub.is_hub_id`, the rule models follow too) and has no data-file suffix
                                        -> `datasets.load_dataset` on the Hugging Face Hub
     (`data.streaming=true` streams it instead of downloading it first)
  5. anything else (`data/x.csv`, `./x`, `a/b/c` that do not exist) -> DataError naming the missing path

Local formats, chosen by extension (`readers.FORMATS`, the one list): .csv (header row), .json (a
list of objects, or an object of equal-length column lists; read whole), .jsonl/.ndjson (one object
a line), .parquet, .txt (one column, `text`; one document per paragraph: blank lines separate
documents). All but .json are read in batches of `data.read_batch_docs` rows, so memory does not
grow with the corpus.

Work is split into units (one per input file; one for a Hub dataset, a saved dataset or the
synthetic corpus). Each unit has a stable key; `prepare` shards, splits and distributes work by unit.

Text: `data.template` ("{title}\\n{abstract}") is filled per row; otherwise the `data.text_column`
value is the text. With `normalize_whitespace` each field is whitespace-normalised *before* the
template is applied. Missing values (None/NaN) read as "". Bytes that are not valid UTF-8 are
replaced (one U+FFFD per bad byte) and counted. Empty documents are dropped and counted.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etils import epath

from flax_gpt import hub, storage
from flax_gpt.data import synthetic
from flax_gpt.data.dataset_folder import is_saved_dataset, readme_configs, snapshot_files
from flax_gpt.data.readers import FORMATS, Table, check_file, is_data_file, read_file, read_hub, read_saved
from flax_gpt.errors import DataError

# Files we do not read (besides `FORMATS`): a missing name ending so is still no Hub dataset id.
_OTHER_FILE_SUFFIXES = (".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".arrow")


@dataclass
class Unit:
    """A piece of the source read by one worker: `tables()` streams its rows in source order."""

    key: str
    tables: Callable[[], Iterator[Table]]


@dataclass
class Source:
    kind: str  # synthetic | files | saved | hub
    units: list[Unit]
    fingerprint: str
    description: str
    synthetic: bool = False


@dataclass
class Documents:
    """Texts in source order, plus what reading them cost (for tests and small corpora)."""

    texts: list[str]
    description: str
    fingerprint: str
    synthetic: bool = False
    empty_dropped: int = 0
    invalid_utf8_replaced: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- resolution


def resolve_source(source: Any, cfg=None) -> tuple[str, Any]:
    """("synthetic", "synthetic") | ("files", [paths]) | ("saved", folder) | ("hub", id);
    DataError when none fits."""
    if isinstance(source, (list, tuple)):
        return "files", _list_files(source, cfg)
    text = str(source).strip()
    if text == "synthetic":
        return "synthetic", "synthetic"
    if not text:
        raise DataError("data.source is empty; use synthetic, files or a Hub dataset id")
    remote = storage.is_remote(text)
    if remote:
        storage.check_reachable(text, "data.source")
    if any(c in text for c in "*?["):
        return "files", _glob_files(text, remote)
    path = epath.Path(text if remote else os.path.expanduser(text))
    if path.is_dir():
        return _resolve_folder(path, cfg)
    if path.exists():
        return "files", [check_file(path)]
    if not remote and hub.is_hub_id(text) and not _looks_like_file(text):
        return "hub", text
    where = "" if remote else f" (from {os.getcwd()})"
    raise DataError(f"data.source path not found: {text}{where}; fix the path, or use "
                    "synthetic, or a Hub dataset id like imdb or CShorten/ML-ArXiv-Papers")


def _list_files(source: list | tuple, cfg) -> list:
    """The files of a list of sources, each once, in order; every item must resolve to files."""
    if not source:
        raise DataError("data.source is an empty list; give at least one file, glob or folder")
    paths: list = []
    for item in source:
        kind, found = resolve_source(str(item), cfg)
        if kind != "files":
            raise DataError(f"data.source list item {item!r} is not a file, glob or folder of files; "
                            "lists may only hold files")
        paths += [p for p in found if p not in paths]
    return paths


def _glob_files(pattern: str, remote: bool) -> list[epath.Path]:
    if remote:
        fs, _ = storage._fs(pattern)
        found = [epath.Path(f"{pattern.split('://')[0]}://{p}") for p in sorted(fs.glob(pattern))]
    else:
        found = [epath.Path(p) for p in sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))]
    files = [p for p in found if not p.is_dir()]  # a FIFO among them is refused, not skipped
    if not files:
        raise DataError(f"data.source glob {pattern!r} matches no files; check the pattern and "
                        "the working directory")
    return [check_file(p) for p in files]


def _resolve_folder(path: epath.Path, cfg) -> tuple[str, Any]:
    """A saved dataset, a Hub dataset snapshot's files for the configured split, or the folder's data files."""
    if is_saved_dataset(path):
        return "saved", path
    if readme_configs(path) is not None or (path / "data").is_dir():
        split = cfg or _Split()
        return "files", snapshot_files(path, split.hf_split, split.hf_name)
    files = [check_file(p) for p in sorted(path.iterdir()) if is_data_file(p) and not p.is_dir()]
    if not files:
        raise DataError(f"folder {path} holds no {'/'.join(FORMATS)} files and is not a dataset "
                        "folder (save_to_disk, or a Hub repo snapshot); point data.source at the files")
    return "files", files


def _looks_like_file(text: str) -> bool:
    """A missing name ending so is a mistyped file, never a Hub dataset id (ids may hold dots too)."""
    suffix = Path(text).suffix.lower()
    return suffix in FORMATS or suffix in _OTHER_FILE_SUFFIXES


@dataclass
class _Split:
    hf_split: str = "train"
    hf_name: str = ""


def _hash_file(h, path: epath.Path) -> None:
    h.update(path.name.encode() + b"\0")
    if storage.is_remote(path):  # the bucket's own checksum and size: no need to read the object
        fs, p = storage._fs(str(path))
        info = fs.info(p)
        h.update(json.dumps([info.get("crc32c"), info.get("md5Hash"), info.get("size")]).encode())
        return
    with open(str(path), "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())


def open_source(cfg) -> Source:
    """Resolve `cfg.source` into units, with a fingerprint (changes when the input changes) and a
    one-line description. Local files are hashed by content. A Hub dataset is identified by
    (id, name, split, revision): with an empty revision an upstream change is not detected, so pin
    data.hf_revision or pass --overwrite."""
    kind, where = resolve_source(cfg.source, cfg)
    h = hashlib.sha256()
    batch = cfg.read_batch_docs
    if kind == "synthetic":
        h.update(json.dumps(["synthetic", synthetic.GENERATOR_VERSION, synthetic.SYNTHETIC_SEED,
                             cfg.synthetic_docs]).encode())
        desc = (f"synthetic: {cfg.synthetic_docs} generated ML-abstract-like documents "
                f"(flax_gpt generator v{synthetic.GENERATOR_VERSION}, seed {synthetic.SYNTHETIC_SEED}); "
                "not real text")
        unit = Unit("synthetic", lambda: (Table(t, "synthetic") for t in synthetic.generate_batches(
            cfg.synthetic_docs, batch)))
        return Source(kind, [unit], h.hexdigest(), desc, synthetic=True)
    if kind == "hub":
        if not hub.hub_reachable():
            raise DataError(f"cannot load Hub dataset {where!r} (no local path of that name either, from "
                            f"{os.getcwd()}): the Hugging Face Hub is unreachable (offline?); point data.source at "
                            "local files (csv/json/jsonl/parquet/txt) or use synthetic (or set HF_HUB_OFFLINE=1 if "
                            "the dataset is in your HF cache)")
        h.update(json.dumps(["hub", where, cfg.hf_name, cfg.hf_split, cfg.hf_revision]).encode())
        desc = f"Hugging Face dataset {where}" + (f" ({cfg.hf_name})" if cfg.hf_name else "") + \
            f", split {cfg.hf_split}" + (f", revision {cfg.hf_revision}" if cfg.hf_revision else "")
        return Source(kind, [Unit(f"hub:{where}", lambda: read_hub(cfg, where))], h.hexdigest(), desc)
    if kind == "saved":
        for f in sorted(p for p in where.iterdir() if p.is_file() or p.is_dir()):
            for g in ([f] if f.is_file() else sorted(x for x in f.iterdir() if x.is_file())):
                _hash_file(h, g)
        h.update(cfg.hf_split.encode())
        desc = f"saved dataset {where} (datasets.save_to_disk), split {cfg.hf_split}"
        return Source(kind, [Unit(where.name, lambda: read_saved(cfg, where))], h.hexdigest(), desc)
    for p in where:
        _hash_file(h, p)
    names = ", ".join(str(p) for p in where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    # A unit's key is its file's stem, so the same rows as csv or as parquet split the same way.
    units = [Unit(p.stem, lambda p=p: read_file(p, batch)) for p in where]
    return Source(kind, units, h.hexdigest(), f"files ({len(where)}): {names}")


def source_fingerprint(cfg) -> tuple[str, str, bool]:
    """(fingerprint, description, synthetic) of the configured source, without reading documents."""
    src = open_source(cfg)
    return src.fingerprint, src.description, src.synthetic


# ---------------------------------------------------------------------------- text extraction


def normalize(value: Any, enabled: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    s = value if isinstance(value, str) else str(value)
    return " ".join(s.split()) if enabled else s


def template_fields(template: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"data.template {template!r} is not a valid format string ({e}); "
                        "use {column} fields and double braces {{ }} for literal braces") from None
    names = []
    for _, fname, _, _ in parsed:
        if fname is None:
            continue
        base = re.split(r"[.\[]", fname, maxsplit=1)[0]
        if not base:
            raise DataError(f"data.template {template!r} has a positional field {{}}; name the "
                            "column, e.g. {abstract}")
        names.append(base)
    return names


def table_texts(table: Table, cfg) -> list[str]:
    """The documents of one table (possibly empty strings; the caller drops and counts those)."""
    available = list(table.columns)
    norm = cfg.normalize_whitespace
    if cfg.template:
        needed = list(dict.fromkeys(template_fields(cfg.template)))
        missing = [c for c in needed if c not in table.columns]
        if missing and table.columns:
            raise DataError(f"data.template uses column(s) {missing} not in {table.name}; "
                            f"columns are {available}")
        if table.num_rows == 0:
            return []
        cols = [table.columns[c] for c in needed]
        return [cfg.template.format_map(dict(zip(needed, (normalize(v, norm) for v in values))))
                for values in zip(*cols)]
    column = cfg.text_column
    if column not in table.columns:
        if list(table.columns) == ["text"]:  # a .txt file: its one column is the text
            column = "text"
        elif table.columns:
            raise DataError(f"data.text_column {column!r} is not a column of {table.name}; "
                            f"columns are {available}; set data.text_column or data.template")
        else:
            return []
    return [normalize(v, norm) for v in table.columns[column]]


class DocumentCounter:
    """Counts what reading cost: rows read, empty documents dropped, invalid UTF-8 replaced."""

    def __init__(self):
        self.rows_read = self.empty_dropped = self.invalid_utf8_replaced = 0

    def texts(self, table: Table, cfg) -> list[str]:
        raw = table_texts(table, cfg)
        texts = [t for t in raw if t and not t.isspace()]
        self.rows_read += len(raw)
        self.empty_dropped += len(raw) - len(texts)
        self.invalid_utf8_replaced += table.invalid_utf8
        return texts


def check_not_empty(num_docs: int, counter: DocumentCounter, description: str) -> None:
    if num_docs == 0:
        raise DataError(f"no non-empty documents in {description} ({counter.rows_read} rows read, "
                        "all empty); check data.text_column/data.template and the files")


def read_documents(cfg) -> Documents:
    """All documents of `cfg.source` in source order, empty ones dropped and counted (in memory:
    for tests and small corpora; `prepare` streams)."""
    src = open_source(cfg)
    counter = DocumentCounter()
    texts = [t for unit in src.units for table in unit.tables() for t in counter.texts(table, cfg)]
    check_not_empty(len(texts), counter, src.description)
    return Documents(texts, src.description, src.fingerprint, src.synthetic, counter.empty_dropped,
                     counter.invalid_utf8_replaced)
