"""Readers of the source formats, each a stream of `Table` batches of at most `batch` rows (a .json
file is read whole): .csv, .parquet, .jsonl/.ndjson, .json, .txt, a Hub dataset (downloaded, or
streamed with data.streaming), a `save_to_disk` folder. Local or bucket files alike (etils.epath).

`FORMATS` is the one list of file formats: suffix -> reader. Which files a source, folder or dataset
snapshot takes, and how each is read, follow from it; a new format is one entry there.

Bytes that are not valid UTF-8 are replaced (one U+FFFD per bad byte) and counted in the table.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from flax_gpt import storage
from flax_gpt.errors import DataError

_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes smuggled through by the surrogateescape codec
_PARAGRAPH_END = re.compile(r"^\s*$")


@dataclass
class Table:
    """A batch of rows: columns of equal length."""

    columns: dict[str, list]
    name: str
    invalid_utf8: int = 0

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def check_file(path) -> epath.Path:
    """`path` as a data file we can read: a supported suffix, and locally a regular file. A FIFO,
    device or socket is refused before anything opens it: a source is read twice (hashed, then
    parsed), and opening such a file blocks until a writer appears or never ends."""
    path = epath.Path(str(path))
    if not is_data_file(path):
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of "
                        f"{', '.join(FORMATS)}, or a dataset folder")
    if not storage.is_remote(path):
        mode = os.stat(str(path)).st_mode
        if not stat.S_ISREG(mode):
            what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise DataError(f"{path} is {what}, not a regular file; data.source is read twice (hashed, then "
                            "parsed), so save the stream to a file first and point data.source at it")
    return path


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


def is_data_file(path) -> bool:
    """Whether `path`'s suffix names a format we read (`FORMATS`)."""
    return epath.Path(str(path)).suffix.lower() in FORMATS


def read_file(path: epath.Path, batch: int) -> Iterator[Table]:
    """The file's rows in batches of at most `batch` (a .json file in one batch), read as its
    suffix's entry in `FORMATS` says."""
    try:
        yield from FORMATS[path.suffix.lower()](path, batch)
    except (UnicodeError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:120]}); check the file") from None


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


def _read_json_file(path: epath.Path, batch: int) -> Iterator[Table]:
    """A .json file, whole: its objects are not a stream (`batch` does not apply)."""
    text, bad = decode_bytes(path.read_bytes())
    yield _read_json(text.removeprefix("\ufeff"), str(path), bad)


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


# The file formats: suffix (lower case) -> reader(path, batch) -> its rows as Tables of at most
# `batch` rows. The order is the order error messages list them in.
FORMATS: dict[str, Callable[[epath.Path, int], Iterator[Table]]] = {
    ".csv": _read_csv,  # a header row
    ".json": _read_json_file,  # a list of objects, or an object of equal-length column lists
    ".jsonl": _read_jsonl,  # one object a line
    ".ndjson": _read_jsonl,
    ".parquet": _read_parquet,
    ".txt": _read_txt,  # one column, `text`: one document per paragraph
}


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


