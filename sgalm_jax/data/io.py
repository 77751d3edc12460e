"""Reading raw records from local files (JSONL, JSON, parquet) or the Hugging Face hub.

Every record comes with a *location* (``path:line`` for text files, ``path:row N`` for parquet,
``hub name[split]:row N`` for hub data) so that a malformed record can be reported precisely.
Nothing here knows about tasks; :mod:`sgalm_jax.data.base` turns records into examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgalm_jax.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    """One raw record and where it came from (for error messages)."""

    data: Any
    location: str


class MalformedRecord(Exception):
    """Internal: a record that could not even be decoded (bad JSON). Carries its location."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _not_utf8(where: str, e: UnicodeDecodeError, column: int | None = None) -> DataError:
    col = f" column {column}," if column is not None else ""
    return DataError(f"{where}:{col} not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}); "
                     "convert the file to UTF-8")


def check_data_file(path: str | os.PathLike, what: str = "data file") -> None:
    """DataError naming ``path`` unless it is an existing, readable file (not a folder)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a {what}")
    if not p.exists():
        raise DataError(f"{p}: {what} not found")
    if not os.access(p, os.R_OK):
        raise DataError(f"{p}: {what} is not readable (permission denied)")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; a line that is not UTF-8 raises DataError
    naming the file, line and column (instead of a UnicodeDecodeError with no location)."""
    path = str(path)
    check_data_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(f"{path}:{lineno}", e, e.start + 1) from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[RawRecord | MalformedRecord]:
    """Yield one record per non-blank line; undecodable lines are yielded as MalformedRecord."""
    path = str(path)
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            yield RawRecord(json.loads(line), loc)
        except json.JSONDecodeError as e:
            yield MalformedRecord(loc, f"invalid JSON ({e.msg} at column {e.colno})")


def iter_json(path: str | os.PathLike) -> Iterator[RawRecord | MalformedRecord]:
    """Yield the elements of a JSON array (or of a top-level ``{"data": [...]}``), with line numbers.

    The array is decoded element by element with ``raw_decode`` so that each element's starting
    line is known. A file whose content is JSON Lines despite the ``.json`` suffix is read as such.
    """
    path = str(path)
    check_data_file(path)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise _not_utf8(f"{path}:{line}", e) from None
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if i >= len(text):
        return
    if text[i] == "{":
        # Either a single object holding a list, or JSON Lines with a .json suffix.
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if text[end:].strip():  # more content after the first object: JSON Lines
            yield from iter_jsonl(path)
            return
        for key in ("data", "rows", "examples", "instances"):
            if isinstance(obj.get(key), list):
                for k, item in enumerate(obj[key]):
                    yield RawRecord(item, f"{path}:{key}[{k}]")
                return
        yield RawRecord(obj, f"{path}:{_line_of(text, i)}")
        return
    if text[i] != "[":
        raise DataError(f"{path}:{_line_of(text, i)}: expected a JSON array or object")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == "]":
            return
        start = i
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # The rest of the array cannot be located reliably; report and stop.
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield RawRecord(obj, f"{path}:{_line_of(text, start)}")
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "]":
            return
        else:
            raise DataError(f"{path}:{_line_of(text, i)}: expected ',' or ']' in JSON array")


def iter_parquet(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield the rows of a parquet file as dicts (location = row index)."""
    import pyarrow.parquet as pq  # lazy: pyarrow is heavy and only needed for parquet

    path = str(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: cannot read parquet file: {e}") from e
    for k, row in enumerate(table.to_pylist()):
        yield RawRecord(row, f"{path}:row {k}")


def iter_local_file(path: str | os.PathLike) -> Iterator[RawRecord | MalformedRecord]:
    """Dispatch on the file suffix (.jsonl, .json, .parquet)."""
    p = Path(path)
    check_data_file(p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(p)
    if suffix == ".json":
        return iter_json(p)
    if suffix == ".parquet":
        return iter_parquet(p)
    raise DataError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")


def find_split_files(directory: str | os.PathLike, split: str) -> list[Path]:
    """Files for ``split`` in a local directory.

    Accepted names: ``{split}.jsonl|json|parquet``, ``{split}_*.ext`` / ``{split}-*.ext`` (e.g.
    ``train_partial.jsonl``, HF parquet shards ``test-00000-of-00001.parquet``), also one level
    down (``data/`` or a config folder). Raises DataError naming the patterns when none match.
    """
    d = Path(directory)
    found: list[Path] = []
    for sub in (d, *sorted(p for p in d.iterdir() if p.is_dir())):
        for ext in LOCAL_SUFFIXES:
            exact = sub / f"{split}{ext}"
            if exact.is_file():
                found.append(exact)
            found.extend(sorted(sub.glob(f"{split}_*{ext}")))
            found.extend(sorted(sub.glob(f"{split}-*{ext}")))
        if found:
            return found
    raise DataError(
        f"{d}: no file for split {split!r} (looked for {split}.jsonl|json|parquet, "
        f"{split}_*.ext, {split}-*.ext, also one folder down)"
    )


def iter_hub(name: str, config: str | None, split: str, **load_kwargs: Any) -> Iterator[RawRecord]:
    """Yield the rows of ``datasets.load_dataset(name, config, split=split)``.

    Errors (no network, unknown name or split) become DataError naming the dataset.
    """
    try:
        import datasets  # lazy: importing datasets costs about a second
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"loading {name!r} from the hub needs the `datasets` package") from e
    label = f"{name}" + (f"/{config}" if config else "") + f"[{split}]"
    try:
        ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (ConnectionError, ValueError...)
        raise DataError(f"cannot load hub dataset {label}: {type(e).__name__}: {e}") from e
    for k, row in enumerate(ds):
        yield RawRecord(row, f"{label}:row {k}")


def is_local_source(source: str | os.PathLike) -> bool:
    """A source is local when it names an existing file or directory."""
    return Path(source).exists()


def resolve_local(
    source: str | os.PathLike | None,
    data_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None,
    split: str,
) -> list[Path] | None:
    """The local files for ``split``, or None when the data should come from the hub.

    ``data_files`` (split -> path or paths) wins; else a directory ``source`` is searched with
    :func:`find_split_files`; else a file ``source`` is used for every split.
    """
    if data_files:
        if split not in data_files:
            raise DataError(f"data_files has no entry for split {split!r} (has {sorted(data_files)})")
        v = data_files[split]
        paths = [Path(v)] if isinstance(v, (str, os.PathLike)) else [Path(x) for x in v]
        for p in paths:
            check_data_file(p, f"data file for split {split!r}")
        return paths
    if source is None or not is_local_source(source):
        return None
    p = Path(source)
    if p.is_dir():
        return find_split_files(p, split)
    return [p]
