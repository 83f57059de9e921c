"""Reading data sources into raw records, keeping where each one came from.

A line that cannot be parsed becomes a record with `error` set (it goes to quarantine, the run continues); a file
that cannot be read at all, or holds no rows, stops the run with a `DataError` naming it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.errors import DataError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
BUILTIN_PREFIX = "builtin:"


@dataclass
class RawRecord:
    source: str
    row: int  # 1-based position of the record in its source
    line: int | None  # 1-based line in the file, where the format has lines
    data: Any = None
    error: str | None = None  # why the record could not be parsed
    raw_text: str | None = None  # the unparsed text, kept for quarantine

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source}#row{self.row}"


def read_records(path: Path, split: str | None = None, limit: int | None = None) -> Iterator[RawRecord]:
    """Yield the records of one source file or `datasets` folder."""
    reader = _reader_for(path)
    count = 0
    try:
        records = reader(path, split)
        if path.suffix.lower() == ".json":
            records = _labelstudio_rows(list(records))
        for record in records:
            yield record
            count += 1
            if limit is not None and count >= limit:
                return
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", hint="re-save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if count == 0:
        raise DataError(f"{path}: the file holds no rows", hint="check the path, or remove the empty source")


def _labelstudio_rows(records: list[RawRecord]) -> Iterator[RawRecord]:
    """A Label Studio JSON export (tasks with `data` and `annotations`) read as the rows its annotations make
    (`data.labelstudio`); a task that makes none keeps the reason, for quarantine. Other JSON passes unchanged."""
    from tuneloop.data.labelstudio import converted_records, is_export

    if not is_export([record.data for record in records[:20]]):
        yield from records
        return
    for record, (row, dropped) in zip(records, converted_records([r.data for r in records]), strict=True):
        if row is None:
            yield RawRecord(record.source, record.row, record.line, error=dropped, raw_text=json.dumps(record.data))
        else:
            yield RawRecord(record.source, record.row, record.line, data=row)


def _reader_for(path: Path) -> Any:
    if path.is_dir():
        return _read_datasets_folder
    if not path.exists():
        raise DataError(
            f"data source not found: {path}", hint="check data.sources[].path (relative to the config file)"
        )
    readers = {
        ".json": _read_json,
        ".jsonl": _read_jsonl,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
        ".txt": _read_txt,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}",
            hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)} or a folder written by datasets.save_to_disk",
        )
    return reader


def _read_jsonl(path: Path, _split: str | None) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8") as handle:
        row = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                yield RawRecord(str(path), row, line_number, data=json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRecord(
                    str(path),
                    row,
                    line_number,
                    error=f"invalid JSON: {exc.msg} (column {exc.colno})",
                    raw_text=line.rstrip("\n"),
                )


def _read_json(path: Path, split: str | None) -> Iterator[RawRecord]:
    """A JSON array of records (line numbers kept), or JSON Lines saved with a .json name."""
    text = path.read_text(encoding="utf-8")
    start = _skip_whitespace(text, 0)
    if start == len(text):
        return
    if text[start] != "[":
        if text[start] == "{" and "\n{" in text.strip():
            yield from _read_jsonl(path, split)
            return
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        if isinstance(value, dict):
            yield RawRecord(str(path), 1, 1, data=value)
            return
        raise DataError(f"{path}: expected a JSON array of records, found {type(value).__name__}")
    decoder = json.JSONDecoder()
    position, line, counted_to, row = start + 1, 1, 0, 0
    while True:
        position = _skip_whitespace(text, position)
        if position >= len(text):
            raise DataError(f"{path}: the JSON array is not closed (missing ']')")
        if text[position] == "]":
            return
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                hint="a JSON array must parse as a whole; JSON Lines (.jsonl) lets tuneloop quarantine single bad lines",
            ) from exc
        row += 1
        yield RawRecord(str(path), row, line, data=value)
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position += 1


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(path: Path, _split: str | None) -> Iterator[RawRecord]:
    is_tsv = path.suffix.lower() == ".tsv"
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", newline="") as handle:
        # TSV files in the wild (GLUE and friends) use no quoting: a quote is just a character.
        reader = csv.DictReader(
            handle,
            delimiter="\t" if is_tsv else ",",
            quoting=csv.QUOTE_NONE if is_tsv else csv.QUOTE_MINIMAL,
            restkey="__extra__",
        )
        if not reader.fieldnames:
            return
        header_size = len(reader.fieldnames)
        for row, record in enumerate(reader, start=1):
            line = reader.line_num
            extra = record.pop("__extra__", None)
            missing = [key for key, value in record.items() if value is None]
            if extra or missing:
                found = header_size + len(extra or []) - len(missing)
                yield RawRecord(
                    str(path),
                    row,
                    line,
                    error=f"row has {found} fields, the header has {header_size}",
                    raw_text=json.dumps({**record, "__extra__": extra}, ensure_ascii=False),
                )
                continue
            yield RawRecord(str(path), row, line, data=record)


def _read_parquet(path: Path, _split: str | None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(str(path), row, None, data=record)


def _read_txt(path: Path, _split: str | None) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8") as handle:
        row = 0
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                row += 1
                yield RawRecord(str(path), row, line_number, data={"text": line.rstrip("\n")})


def _read_datasets_folder(path: Path, split: str | None) -> Iterator[RawRecord]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(
            f"{path}: not a folder written by datasets.save_to_disk ({type(exc).__name__})",
            hint="point data.sources[].path at a data file or a save_to_disk folder",
        ) from exc
    if isinstance(loaded, DatasetDict):
        if split is None:
            split = "train" if "train" in loaded else None
        if split is None or split not in loaded:
            raise DataError(
                f"{path}: choose a split with data.sources[].split (available: {', '.join(loaded)})",
            )
        loaded = loaded[split]
    assert isinstance(loaded, Dataset)
    for row, record in enumerate(loaded, start=1):
        yield RawRecord(str(path), row, None, data=record)
