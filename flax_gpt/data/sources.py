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
  4. an `owner/name` id                 -> `datasets.load_dataset` on the Hugging Face Hub
     (`data.streaming=true` streams it instead of downloading it first)
  5. anything else                      -> DataError naming the missing path

Local formats, chosen by extension: .csv (header row), .json (a list of objects, or an object of
equal-length column lists; read whole), .jsonl/.ndjson (one object a line), .parquet, .txt (one
column, `text`; one document per paragraph: blank lines separate documents). All but .json are
read in batches of `data.read_batch_docs` rows, so memory does not grow with the corpus.

Work is split into units (one per input file; one for a Hub dataset, a saved dataset or the
synthetic corpus). Each unit has a stable key; `prepare` shards, splits and distributes work by unit.

Text: `data.template` ("{title}\\n{abstract}") is filled per row; otherwise the `data.text_column`
value is the text. With `normalize_whitespace` each field is whitespace-normalised *before* the
template is applied. Missing values (None/NaN) read as "". Bytes that are not valid UTF-8 are
replaced (one U+FFFD per bad byte) and counted. Empty documents are dropped and counted.
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
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from etils import epath

from flax_gpt import storage
from flax_gpt.data import synthetic
from flax_gpt.errors import DataError

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".ndjson", ".parquet", ".txt")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes smuggled through by the surrogateescape codec
_PARAGRAPH_END = re.compile(r"^\s*$")
SPLIT_NAMES = ("train", "validation", "valid", "val", "dev", "test", "eval")


@dataclass
class Table:
    """A batch of rows: columns of equal length."""

    columns: dict[str, list]
    name: str
    invalid_utf8: int = 0

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


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


def _check_suffix(path) -> epath.Path:
    if epath.Path(str(path)).suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {epath.Path(str(path)).suffix or '(none)'}; use one of "
                        f"{', '.join(LOCAL_SUFFIXES)}, or a dataset folder")
    return epath.Path(str(path))


def _is_saved_dataset(folder: epath.Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "state.json").exists() and (folder / "dataset_info.json").exists())


def _readme_configs(folder: epath.Path) -> list[dict] | None:
    """The `configs:` block of a dataset repo's README front matter, if any."""
    readme = folder / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return None
    configs = front.get("configs") if isinstance(front, dict) else None
    return configs if isinstance(configs, list) else None


def _data_files(folder: epath.Path) -> list[epath.Path]:
    out = []
    for p in storage.files_under(folder):
        rel = str(p)[len(str(folder)):].lstrip("/")
        if not any(part.startswith(".") for part in rel.split("/")) and p.suffix.lower() in LOCAL_SUFFIXES:
            out.append(p)
    return out


def _split_of(rel: str) -> str | None:
    for name in SPLIT_NAMES:
        if re.search(rf"(^|[-_./]){name}([-_./]|$)", rel):
            return name
    return None


def _snapshot_files(folder: epath.Path, cfg) -> list[epath.Path]:
    """The files `datasets.load_dataset(folder, name=hf_name, split=hf_split)` would read."""
    split = cfg.hf_split.split("[")[0]
    configs = _readme_configs(folder)
    if configs:
        chosen = next((c for c in configs if c.get("config_name") == cfg.hf_name), None) if cfg.hf_name else \
            next((c for c in configs if c.get("default")), configs[0])
        if chosen is None:
            names = [c.get("config_name") for c in configs]
            raise DataError(f"dataset folder {folder} has no configuration data.hf_name={cfg.hf_name!r}; "
                            f"it has {names}")
        spec = chosen.get("data_files", [])
        entries = [{"split": "train", "path": spec}] if isinstance(spec, (str, list)) and not (
            isinstance(spec, list) and spec and isinstance(spec[0], dict)) else spec
        patterns = [e["path"] for e in entries if e.get("split") == split]
        if not patterns:
            raise DataError(f"dataset folder {folder} (configuration {chosen.get('config_name')!r}) has no "
                            f"split {split!r}; it has {[e.get('split') for e in entries]}; set data.hf_split")
        files = []
        for pattern in patterns:
            for pat in ([pattern] if isinstance(pattern, str) else pattern):
                files += sorted(folder.glob(pat))
        if not files:
            raise DataError(f"dataset folder {folder}: the README's data_files for split {split!r} match no files")
        return [_check_suffix(f) for f in files]
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
    return chosen


def resolve_source(source: Any, cfg=None) -> tuple[str, Any]:
    """("synthetic", "synthetic") | ("files", [paths]) | ("saved", folder) | ("hub", id);
    DataError when none fits."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("data.source is an empty list; give at least one file, glob or folder")
        paths: list = []
        for item in source:
            kind, found = resolve_source(str(item), cfg)
            if kind != "files":
                raise DataError(f"data.source list item {item!r} is not a file, glob or folder of files; "
                                "lists may only hold files")
            paths += [p for p in found if p not in paths]
        return "files", paths
    text = str(source).strip()
    if text == "synthetic":
        return "synthetic", "synthetic"
    if not text:
        raise DataError("data.source is empty; use synthetic, files or a Hub dataset id")
    remote = storage.is_remote(text)
    if remote:
        storage.check_reachable(text, "data.source")
    path = epath.Path(text if remote else os.path.expanduser(text))
    if any(c in text for c in "*?["):
        if remote:
            fs, _ = storage._fs(text)
            found = [epath.Path(f"{text.split('://')[0]}://{p}") for p in sorted(fs.glob(text))]
        else:
            found = [epath.Path(p) for p in sorted(globlib.glob(os.path.expanduser(text), recursive=True))]
        files = [p for p in found if p.is_file()]
        if not files:
            raise DataError(f"data.source glob {text!r} matches no files; check the pattern and "
                            "the working directory")
        return "files", [_check_suffix(p) for p in files]
    if path.is_dir():
        if _is_saved_dataset(path):
            return "saved", path
        if _readme_configs(path) is not None or (path / "data").is_dir():
            return "files", _snapshot_files(path, cfg or _Split())
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files and is not a dataset "
                            "folder (save_to_disk, or a Hub repo snapshot); point data.source at the files")
        return "files", files
    if path.exists():
        return "files", [_check_suffix(path)]
    looks_like_file = Path(text).suffix.lower() in LOCAL_SUFFIXES
    if not remote and storage.is_hub_id(text) and not looks_like_file:
        return "hub", text
    where = "" if remote else f" (from {os.getcwd()})"
    raise DataError(f"data.source path not found: {text}{where}; fix the path, or use "
                    "synthetic, or a Hub dataset id like CShorten/ML-ArXiv-Papers")


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
        if not storage.hub_reachable():
            raise DataError(f"cannot load Hub dataset {where!r}: the Hugging Face Hub is unreachable "
                            "(offline?); point data.source at local files (csv/json/jsonl/parquet/txt) or use "
                            "synthetic (or set HF_HUB_OFFLINE=1 if the dataset is in your HF cache)")
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


# ---------------------------------------------------------------------------- readers


def decode_bytes(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid bytes replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
        bad = len(_ESCAPED.findall(text))
        return _ESCAPED.sub("\ufffd", text), bad


def _fix(text: str) -> tuple[str, int]:
    """A str decoded with surrogateescape -> (text with U+FFFD for bad bytes, their count)."""
    if not _ESCAPED.search(text):
        return text, 0
    return _ESCAPED.sub("\ufffd", text), len(_ESCAPED.findall(text))


def _columns_from_records(records: list, name: str) -> dict[str, list]:
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{name}: expected JSON objects (one per document); found "
                        f"{type(next(r for r in records if not isinstance(r, dict))).__name__}")
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r))
    return {c: [r.get(c) for r in records] for c in names}


def _text_stream(path: epath.Path):
    raw = path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def read_file(path: epath.Path, batch: int) -> Iterator[Table]:
    """The file's rows in batches of at most `batch` (a .json file in one batch)."""
    suffix, name = path.suffix.lower(), str(path)
    try:
        if suffix == ".parquet":
            yield from _read_parquet(path, batch)
        elif suffix == ".csv":
            yield from _read_csv(path, batch)
        elif suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path, batch)
        elif suffix == ".json":
            text, bad = decode_bytes(path.read_bytes())
            yield _read_json(text.removeprefix("\ufeff"), name, bad)
        else:
            yield from _read_txt(path, batch)
    except (UnicodeError, pa.ArrowException) as e:
        raise DataError(f"{name}: cannot be read ({type(e).__name__}: {str(e)[:120]}); check the file") from None


def _read_parquet(path: epath.Path, batch: int) -> Iterator[Table]:
    with path.open("rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e}); check the file") from None
        names = pf.schema_arrow.names
        if pf.metadata.num_rows == 0:
            yield Table({n: [] for n in names}, str(path))
            return
        for rb in pf.iter_batches(batch_size=batch):
            cols, bad = {}, 0
            for n in names:
                col = rb.column(n)
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    # Arrow does not always validate UTF-8: decode the raw bytes ourselves.
                    values = []
                    for b in col.cast(pa.large_binary()).to_pylist():
                        if b is None:
                            values.append(None)
                        else:
                            s, n_bad = decode_bytes(b)
                            values.append(s)
                            bad += n_bad
                    cols[n] = values
                else:
                    cols[n] = col.to_pylist()
            yield Table(cols, str(path), bad)


def _read_csv(path: epath.Path, batch: int) -> Iterator[Table]:
    limit = csv.field_size_limit(1 << 30)  # documents may exceed csv's 128 KiB field default
    try:
        with _text_stream(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                yield Table({}, str(path))
                return
            rows: list[list[str]] = []
            try:
                for row in reader:
                    rows.append(row)
                    if len(rows) == batch:
                        yield _csv_table(header, rows, path)
                        rows = []
            except csv.Error as e:
                raise DataError(f"{path}: malformed CSV at line {reader.line_num} ({e}); fix the file") from None
            if rows or not batch:
                yield _csv_table(header, rows, path)
    finally:
        csv.field_size_limit(limit)


def _csv_table(header: list[str], rows: list[list[str]], path) -> Table:
    bad = 0
    cols = {}
    for i, name in enumerate(header):
        values = []
        for r in rows:
            v = r[i] if i < len(r) else None
            if v is not None:
                v, n = _fix(v)
                bad += n
            values.append(v)
        cols[name] = values
    return Table(cols, str(path), bad)


def _read_jsonl(path: epath.Path, batch: int) -> Iterator[Table]:
    records, bad = [], 0
    with _text_stream(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            line, n = _fix(line)
            bad += n
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON line ({e.msg}); fix or remove it") from None
            if len(records) == batch:
                yield Table(_columns_from_records(records, str(path)), str(path), bad)
                records, bad = [], 0
    if records:
        yield Table(_columns_from_records(records, str(path)), str(path), bad)


def _read_json(text: str, name: str, bad: int) -> Table:
    try:
        obj = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: invalid JSON at line {e.lineno} ({e.msg}); if it holds one object "
                        "per line, name it .jsonl") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        if len({len(v) for v in obj.values()}) != 1:
            raise DataError(f"{name}: column lists have different lengths {sorted({len(v) for v in obj.values()})}; "
                            "give equal-length columns or a list of objects")
        return Table(obj, name, bad)
    if isinstance(obj, list):
        return Table(_columns_from_records(obj, name), name, bad)
    raise DataError(f"{name}: expected a list of objects or an object of column lists")


def _read_txt(path: epath.Path, batch: int) -> Iterator[Table]:
    """Paragraphs: lines up to a blank (whitespace-only) line make one document."""
    docs, current, bad = [], [], 0
    with _text_stream(path) as f:
        for line in f:
            if _PARAGRAPH_END.match(line):
                if current:
                    text, n = _fix("".join(current).strip("\n"))
                    docs.append(text)
                    bad += n
                    current = []
                    if len(docs) == batch:
                        yield Table({"text": docs}, str(path), bad)
                        docs, bad = [], 0
                continue
            current.append(line)
    if current:
        text, n = _fix("".join(current).strip("\n"))
        docs.append(text)
        bad += n
    yield Table({"text": docs}, str(path), bad)


def _dataset_batches(ds, name: str, batch: int) -> Iterator[Table]:
    for rows in ds.iter(batch_size=batch):
        yield Table({c: list(v) for c, v in rows.items()}, name, 0)


def read_hub(cfg, dataset_id: str) -> Iterator[Table]:
    """`datasets.load_dataset` on the Hub (streamed with data.streaming)."""
    import datasets  # deferred: heavy (pandas, fsspec); only Hub and saved datasets need it

    extra = {"streaming": True} if cfg.streaming else {}
    try:
        ds = datasets.load_dataset(dataset_id, name=cfg.hf_name or None, split=cfg.hf_split,
                                   revision=cfg.hf_revision or None, **extra)
    except Exception as e:  # noqa: BLE001 - network, auth and naming failures all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load Hub dataset {dataset_id!r} (split {cfg.hf_split!r}): "
                        f"{type(e).__name__}: {first}; the Hub may be unreachable (offline?) - "
                        "point data.source at local files (csv/json/jsonl/parquet/txt) or use synthetic") from None
    if isinstance(ds, dict):  # a DatasetDict when split is None
        raise DataError(f"Hub dataset {dataset_id!r} has splits {sorted(ds)}; set data.hf_split to one")
    try:
        yield from _dataset_batches(ds, f"{dataset_id}:{cfg.hf_split}", cfg.read_batch_docs)
    except (OSError, ConnectionError) as e:  # a stream that ends early
        raise DataError(f"Hub dataset {dataset_id!r} stopped streaming ({type(e).__name__}: {str(e)[:120]}); "
                        "nothing was written; rerun (finished units are kept)") from None


def read_saved(cfg, folder: epath.Path) -> Iterator[Table]:
    """A `save_to_disk` folder, memory-mapped by `datasets.load_from_disk`."""
    import datasets  # deferred: heavy (pandas, fsspec); only Hub and saved datasets need it

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a damaged folder
        raise DataError(f"cannot read saved dataset {folder} ({type(e).__name__}: {str(e)[:120]}); "
                        "check the folder") from None
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.hf_split.split("[")[0]
        if split not in ds:
            raise DataError(f"saved dataset {folder} has splits {sorted(ds)}, not {split!r}; set data.hf_split")
        ds = ds[split]
    yield from _dataset_batches(ds, str(folder), cfg.read_batch_docs)


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

    def merge(self, other: "DocumentCounter") -> None:
        self.rows_read += other.rows_read
        self.empty_dropped += other.empty_dropped
        self.invalid_utf8_replaced += other.invalid_utf8_replaced


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
