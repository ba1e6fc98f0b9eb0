"""Atomic artifact writing: every output appears whole or not at all.

Writers go to a temporary file beside the target and rename it into place at the end, so an
interrupted stage never leaves a half-written file for DVC (or the next stage) to pick up.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0)
os.umask(_UMASK)

# Fixed writer settings so that equal tables give byte-equal files (DVC hashes, run-cache).
PARQUET_OPTIONS = dict(compression="zstd")


def parquet_options(schema: pa.Schema, compression: dict[str, str] | None = None) -> dict:
    """PARQUET_OPTIONS with dictionary encoding only for the columns whose values repeat (ids,
    keys, text): float tokens and scores and image bytes hardly repeat, and a dictionary made
    reading a 50 x 1280 float16 feature file 2.8x slower and writing it 2x slower (and larger).
    Min/max statistics only for top-level columns: those of the values inside a list (tokens,
    history items) let no reader skip a row group, and for float16 tokens they were a quarter
    of the write time; nor for fixed-size binary values (hashes, a token's bytes), which no
    reader filters on. `compression` overrides the codec of the named top-level columns."""
    leaves = list(_leaves(schema))
    options = {
        **PARQUET_OPTIONS,
        "use_dictionary": [path for path, kind in leaves if _repeats(kind)],
        "write_statistics": [path for path, kind in leaves if ".list." not in path and not pa.types.is_fixed_size_binary(kind)],
    }
    if compression:
        options["compression"] = {path: compression.get(path, PARQUET_OPTIONS["compression"]) for path, _ in leaves}
    return options


def _leaves(fields) -> Iterator[tuple[str, pa.DataType]]:
    """(Parquet column path, Arrow type) of every leaf column, e.g. ("tokens.list.element", float16)."""
    for f in fields:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type):
            values = f.type.value_field.with_name("element")  # Parquet's name for list values
            yield from ((f"{f.name}.list.{path}", kind) for path, kind in _leaves([values]))
        elif pa.types.is_struct(f.type):
            yield from ((f"{f.name}.{path}", kind) for path, kind in _leaves(list(f.type)))
        else:
            yield f.name, f.type


def _repeats(kind: pa.DataType) -> bool:
    return not (pa.types.is_floating(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                or pa.types.is_fixed_size_binary(kind))


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``target``, on error it is removed.

    A killed process leaves its temp file behind (no `finally` runs): the next write of the same
    target removes it. Git and DVC ignore the pattern (.gitignore, .dvcignore)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared files
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def with_metadata(schema: pa.Schema, metadata: dict[str, Any] | None) -> pa.Schema:
    """Attach provenance as JSON-encoded schema metadata (readable by any Parquet tool)."""
    if not metadata:
        return schema
    encoded = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    return schema.with_metadata({**(schema.metadata or {}), **{k.encode(): v.encode() for k, v in encoded.items()}})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON provenance written by :func:`with_metadata`."""
    raw = pq.read_metadata(path).metadata or {}  # the footer: schema metadata + keys added at the end
    out = {}
    for k, v in raw.items():
        key = k.decode()
        if key == "ARROW:schema":
            continue
        try:
            out[key] = json.loads(v)
        except json.JSONDecodeError:
            out[key] = v.decode()
    return out


class ArtifactError(ValueError):
    """An input file that is not what the stage writing it writes (cut short, corrupt, another
    schema, non-finite values); the message names the file, what is wrong and what to rerun."""


def read_checked(path: str | Path, schema: pa.Schema, rerun: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """The Parquet file ``path`` (``columns`` of it, default all of ``schema``) after checking
    that each column read is there with its type in ``schema``; ``rerun`` says what rewrites it."""
    path, names = Path(path), columns or schema.names
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; {rerun}")
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise ArtifactError(f"{path}: not a readable Parquet file, cut short or corrupt ({err}); {rerun}") from None
    for name in names:
        expected = schema.field(name).type
        if name not in found.names:
            raise ArtifactError(f"{path}: column {name} is missing; {rerun}")
        if found.field(name).type != expected:
            raise ArtifactError(f"{path}: column {name} is {found.field(name).type}, expected {expected}; {rerun}")
    try:
        return pq.read_table(path, columns=list(names), filters=filters)
    except (OSError, pa.ArrowException) as err:
        raise ArtifactError(f"{path}: cannot be read, cut short or corrupt ({err}); {rerun}") from None


def write_table(
    table: pa.Table, path: str | Path, schema: pa.Schema, metadata: dict | None = None, compression: dict[str, str] | None = None
) -> None:
    """Write a whole table with an explicit schema (cast, so a mismatch fails loudly);
    `compression`: codecs of some columns (parquet_options)."""
    schema = with_metadata(schema, metadata)
    table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **parquet_options(schema, compression))


@contextlib.contextmanager
def parquet_writer(path: str | Path, schema: pa.Schema, metadata: dict | None = None) -> Iterator[pq.ParquetWriter]:
    """A streaming writer (one row group per ``write_table``) that lands atomically."""
    schema = with_metadata(schema, metadata)
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, **parquet_options(schema))
        try:
            yield writer
        finally:
            writer.close()


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the fingerprint one artifact records of another."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
