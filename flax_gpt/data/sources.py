"""Where documents come from: a Hub dataset, local files, or the synthetic generator.

`data.source` is resolved in this order:
  1. "synthetic"                          -> `synthetic.generate_table`
  2. an existing path or a glob that matches (a str or a list of them; a folder means every
     supported file directly inside it)    -> local files
  3. an `owner/name` id (not ending in a file suffix such as .csv)
                                          -> `datasets.load_dataset` on the Hugging Face Hub
  4. anything else                        -> DataError naming the missing path

Local formats, chosen by extension: .csv (header row), .json (a list of objects, or an object of
equal-length column lists), .jsonl/.ndjson (one object a line), .parquet, .txt. A .txt file has one
column, `text`, and one document per paragraph: blank lines separate documents, single newlines
stay inside a document (so a file with one document a line needs a blank line between them).

Text: `data.template` ("{title}\n{abstract}") is filled per row with `str.format_map`; otherwise
the `data.text_column` value is the text. With `normalize_whitespace` each field value is
whitespace-normalised (runs of spaces, tabs, newlines -> one space, stripped) *before* the template
is applied, so the template's own newlines survive. Missing values (None/NaN) read as "".

Bytes that are not valid UTF-8 are decoded with replacement (one U+FFFD per bad byte) and counted;
the count lands in the manifest's `stats.invalid_utf8_replaced`. Documents whose text is empty or
whitespace-only are dropped and counted in `stats.empty_dropped`.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import io
import json
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from flax_gpt import storage
from flax_gpt.data import synthetic
from flax_gpt.errors import DataError

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".ndjson", ".parquet", ".txt")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes smuggled through by the surrogateescape codec
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")


@dataclass
class Documents:
    """Texts in source order, plus what reading them cost."""

    texts: list[str]
    description: str
    fingerprint: str
    synthetic: bool = False
    empty_dropped: int = 0
    invalid_utf8_replaced: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    """One file's (or dataset's) columns; values are lists of equal length."""

    columns: dict[str, list]
    name: str
    invalid_utf8: int = 0

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


# ---------------------------------------------------------------------------- resolution


def resolve_source(source: Any) -> tuple[str, list[Path] | str]:
    """("synthetic", "synthetic") | ("local", [paths]) | ("hub", id); DataError when none fits."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("data.source is an empty list; give at least one file, glob or folder")
        paths: list[Path] = []
        for item in source:
            kind, found = resolve_source(str(item))
            if kind != "local":
                raise DataError(f"data.source list item {item!r} is not a local file, glob or folder; "
                                "lists may only hold local paths")
            paths += [p for p in found if p not in paths]
        return "local", paths
    text = str(source).strip()
    if text == "synthetic":
        return "synthetic", "synthetic"
    if not text:
        raise DataError("data.source is empty; use synthetic, local files or a Hub dataset id")
    path = Path(text).expanduser()
    if path.is_file():
        return "local", [_check_suffix(path)]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files; "
                            "point data.source at the files themselves")
        return "local", files
    if globlib.has_magic(text):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)
                       if Path(p).is_file())
        if not files:
            raise DataError(f"data.source glob {text!r} matches no files; check the pattern and "
                            "the working directory")
        return "local", [_check_suffix(p) for p in files]
    looks_like_file = Path(text).suffix.lower() in LOCAL_SUFFIXES
    if storage.is_hub_id(text) and not looks_like_file:
        return "hub", text
    raise DataError(f"data.source path not found: {text} (from {os.getcwd()}); fix the path, or use "
                    "synthetic, or a Hub dataset id like CShorten/ML-ArXiv-Papers")


def _check_suffix(path: Path) -> Path:
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of "
                        f"{', '.join(LOCAL_SUFFIXES)}")
    return path


def source_fingerprint(cfg) -> tuple[str, str, bool]:
    """(fingerprint, description, synthetic) of the configured source, without tokenizing.

    Local files are hashed by content (so editing a file triggers a rebuild). A Hub dataset is
    identified by (id, name, split, revision): with an empty revision an upstream change is not
    detected, so pin data.hf_revision or pass --overwrite.
    """
    kind, where = resolve_source(cfg.source)
    h = hashlib.sha256()
    if kind == "synthetic":
        h.update(json.dumps(["synthetic", synthetic.GENERATOR_VERSION, synthetic.SYNTHETIC_SEED,
                             cfg.synthetic_docs]).encode())
        desc = (f"synthetic: {cfg.synthetic_docs} generated ML-abstract-like documents "
                f"(flax_gpt generator v{synthetic.GENERATOR_VERSION}, seed {synthetic.SYNTHETIC_SEED}); "
                "not real text")
        return h.hexdigest(), desc, True
    if kind == "hub":
        h.update(json.dumps(["hub", where, cfg.hf_name, cfg.hf_split, cfg.hf_revision]).encode())
        desc = f"Hugging Face dataset {where}" + (f" ({cfg.hf_name})" if cfg.hf_name else "") + \
            f", split {cfg.hf_split}" + (f", revision {cfg.hf_revision}" if cfg.hf_revision else "")
        return h.hexdigest(), desc, False
    for p in where:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    names = ", ".join(str(p) for p in where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    return h.hexdigest(), f"local files ({len(where)}): {names}", False


# ---------------------------------------------------------------------------- readers


def decode_bytes(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid bytes replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
        bad = len(_ESCAPED.findall(text))
        return _ESCAPED.sub("\ufffd", text), bad


def _read_text_file(path: Path) -> tuple[str, int]:
    text, bad = decode_bytes(path.read_bytes())
    return text.removeprefix("\ufeff"), bad


def _columns_from_records(records: list, path: Path) -> dict[str, list]:
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: expected JSON objects (one per document); found "
                        f"{type(next(r for r in records if not isinstance(r, dict))).__name__}")
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r))
    return {c: [r.get(c) for r in records] for c in names}


def read_table(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e}); check the file") from None
        cols, bad = {}, 0
        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                # Arrow does not always validate UTF-8: decode the raw bytes ourselves.
                raw = col.cast(pa.large_binary()).to_pylist()
                values = []
                for b in raw:
                    if b is None:
                        values.append(None)
                    else:
                        s, n = decode_bytes(b)
                        values.append(s)
                        bad += n
                cols[name] = values
            else:
                cols[name] = col.to_pylist()
        return Table(cols, str(path), bad)
    text, bad = _read_text_file(path)
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return Table({}, str(path), bad)
        limit = csv.field_size_limit(1 << 30)  # documents may exceed csv's 128 KiB field default
        try:
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV at line {reader.line_num} ({e}); fix the file") from None
        finally:
            csv.field_size_limit(limit)
        cols = {name: [r[i] if i < len(r) else None for r in rows] for i, name in enumerate(header)}
        return Table(cols, str(path), bad)
    if suffix in (".jsonl", ".ndjson"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg}); fix or remove it") from None
        return Table(_columns_from_records(records, path), str(path), bad)
    if suffix == ".json":
        try:
            obj = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); if it holds one object "
                            "per line, name it .jsonl") from None
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            lengths = {len(v) for v in obj.values()}
            if len(lengths) != 1:
                raise DataError(f"{path}: column lists have different lengths {sorted(lengths)}; "
                                "give equal-length columns or a list of objects")
            return Table(obj, str(path), bad)
        if isinstance(obj, list):
            return Table(_columns_from_records(obj, path), str(path), bad)
        raise DataError(f"{path}: expected a list of objects or an object of column lists")
    if suffix == ".txt":
        paragraphs = [p for p in _PARAGRAPH.split(text)]
        return Table({"text": paragraphs}, str(path), bad)
    raise DataError(f"{path}: unsupported file type {suffix}")  # resolve_source filters these


def read_hub(cfg, dataset_id: str) -> Table:
    """`datasets.load_dataset` on the Hub; offline this fails with a DataError that says so."""
    if not storage.hub_reachable():
        raise DataError(f"cannot load Hub dataset {dataset_id!r}: the Hugging Face Hub is unreachable "
                        "(offline?); point data.source at local files (csv/json/jsonl/parquet/txt) or use "
                        "synthetic (or set HF_HUB_OFFLINE=1 if the dataset is in your HF cache)")
    import datasets  # deferred: heavy (pandas, fsspec); only Hub sources need it

    try:
        ds = datasets.load_dataset(dataset_id, name=cfg.hf_name or None, split=cfg.hf_split,
                                   revision=cfg.hf_revision or None)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load Hub dataset {dataset_id!r} (split {cfg.hf_split!r}): "
                        f"{type(e).__name__}: {first}; the Hub may be unreachable (offline?) - "
                        "point data.source at local files (csv/json/jsonl/parquet/txt) or use synthetic") from None
    if isinstance(ds, dict):  # a DatasetDict when split is None
        raise DataError(f"Hub dataset {dataset_id!r} has splits {sorted(ds)}; set data.hf_split to one")
    return Table({c: ds[c] for c in ds.column_names}, f"{dataset_id}:{cfg.hf_split}", 0)


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
    if table.num_rows == 0:
        return []
    available = list(table.columns)
    norm = cfg.normalize_whitespace
    if cfg.template:
        needed = list(dict.fromkeys(template_fields(cfg.template)))
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise DataError(f"data.template uses column(s) {missing} not in {table.name}; "
                            f"columns are {available}")
        cols = [table.columns[c] for c in needed]
        out = []
        for values in zip(*cols):
            row = dict(zip(needed, (normalize(v, norm) for v in values)))
            out.append(cfg.template.format_map(row))
        return out
    column = cfg.text_column
    if column not in table.columns:
        if list(table.columns) == ["text"]:  # a .txt file: its one column is the text
            column = "text"
        else:
            raise DataError(f"data.text_column {column!r} is not a column of {table.name}; "
                            f"columns are {available}; set data.text_column or data.template")
    return [normalize(v, norm) for v in table.columns[column]]


def iter_tables(cfg) -> Iterable[Table]:
    kind, where = resolve_source(cfg.source)
    if kind == "hub":
        yield read_hub(cfg, where)
    elif kind == "local":
        for p in where:
            yield read_table(p)
    else:
        raise DataError("iter_tables does not handle synthetic sources")


class DocumentStream:
    """Iterate to get lists of non-empty document texts (one list per file/table, in source
    order) while the counters fill in; lets `prepare` tokenize one file while parsing the next."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.fingerprint, self.description, self.synthetic = source_fingerprint(cfg)
        self.rows_read = 0
        self.empty_dropped = 0
        self.invalid_utf8_replaced = 0

    def __iter__(self):
        if self.synthetic:
            tables = iter([Table(synthetic.generate_table(self.cfg.synthetic_docs), "synthetic")])
        else:
            tables = iter_tables(self.cfg)
        for table in tables:
            raw = table_texts(table, self.cfg)
            texts = [t for t in raw if t and not t.isspace()]
            self.rows_read += len(raw)
            self.empty_dropped += len(raw) - len(texts)
            self.invalid_utf8_replaced += table.invalid_utf8
            if texts:
                yield texts

    def check_not_empty(self, num_docs: int) -> None:
        if num_docs == 0:
            raise DataError(f"no non-empty documents in {self.description} ({self.rows_read} rows read, "
                            "all empty); check data.text_column/data.template and the files")


def read_documents(cfg) -> Documents:
    """All documents of `cfg.source` in source order, empty ones dropped and counted."""
    stream = DocumentStream(cfg)
    texts = [t for chunk in stream for t in chunk]
    stream.check_not_empty(len(texts))
    return Documents(texts, stream.description, stream.fingerprint, stream.synthetic,
                     stream.empty_dropped, stream.invalid_utf8_replaced)
