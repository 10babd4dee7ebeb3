"""Is this file the shard it claims to be? Size, sha256 and a parquet footer with a text column (`text`,
or the run's --text-column).

Every check raises CorruptShardError naming the file and what was wrong; nothing here deletes or
repairs anything (fetch.py decides that). Only the footer is read, never the data pages, so
check_parquet is cheap even on a 100 MB shard.

Shards are untrusted input, and a parquet row group can be a decompression bomb: a few KB of zstd that
expand to gigabytes. RowGroupLimits caps what one row group may hold: rows, and bytes of `text`
uncompressed as the footer declares them (check_row_group, run by check_parquet on every row group and
by the loader before each read) and as they decode (decoded_too_big, checked by the loader while it
reads, since a footer can lie and a dictionary page can expand far beyond its declared size).
Defaults are generous for real data (nanochat's shards have row groups of 1,024 documents, a few MB);
the edges (CLI, trainer, drop-in) raise them for genuine bigger shards from SHARDSTREAM_MAX_ROW_GROUP_BYTES
/ _ROWS with configure_row_group_limits: fetch.py and the loader check every shard without passing limits.
"""
import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, CorruptShardError, SchemaError

HASH_CHUNK = 1 << 20

MAX_BYTES_ENV = "SHARDSTREAM_MAX_ROW_GROUP_BYTES"   # named in the messages: what raises a cap
MAX_ROWS_ENV = "SHARDSTREAM_MAX_ROW_GROUP_ROWS"
DEFAULT_MAX_ROW_GROUP_BYTES = 512 << 20    # of `text` per row group, uncompressed (real ones: a few MB)
DEFAULT_MAX_ROW_GROUP_ROWS = 1 << 20       # pyarrow's own default maximum row group length
TEXT_COLUMN = "text"


@dataclass(frozen=True)
class RowGroupLimits:
    """The most one row group may hold: `max_bytes` of `text` (uncompressed / decoded), `max_rows` rows."""
    max_bytes: int = DEFAULT_MAX_ROW_GROUP_BYTES
    max_rows: int = DEFAULT_MAX_ROW_GROUP_ROWS


def _positive_int(value, name):
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else 0
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(f"{name} must be a positive integer (a number of bytes or rows), got {value!r}")
    return n


_configured = RowGroupLimits()      # the process's caps: the defaults until an edge configures them


def configure_row_group_limits(max_bytes=None, max_rows=None):
    """Set the process's caps (None: the default), what row_group_limits() gives from now on. The edges call
    it with SHARDSTREAM_MAX_ROW_GROUP_BYTES / _ROWS (settings.py); a bad value is a ConfigError naming it."""
    global _configured
    _configured = RowGroupLimits(
        DEFAULT_MAX_ROW_GROUP_BYTES if max_bytes is None else _positive_int(max_bytes, "max_row_group_bytes"),
        DEFAULT_MAX_ROW_GROUP_ROWS if max_rows is None else _positive_int(max_rows, "max_row_group_rows"))
    return _configured


def row_group_limits(max_bytes=None, max_rows=None):
    """RowGroupLimits from the arguments, else the process's caps (configure_row_group_limits; the defaults
    unless an edge set them). A bad argument (not a positive integer) raises ConfigError naming it."""
    return RowGroupLimits(
        _configured.max_bytes if max_bytes is None else _positive_int(max_bytes, "max_row_group_bytes"),
        _configured.max_rows if max_rows is None else _positive_int(max_rows, "max_row_group_rows"))


def text_column_index(meta, column=TEXT_COLUMN):
    """The index of the top-level text column chunk (`column`, `text` unless the run reads another) in a
    parquet FileMetaData, or None."""
    schema = meta.schema
    for j in range(meta.num_columns):
        if schema.column(j).path == column:
            return j
    return None


def _name(path):
    return os.fspath(path) if path is not None else "parquet file"


def check_row_group(path, meta, rg_idx, limits, text_col=None, column=TEXT_COLUMN):
    """Raise CorruptShardError if row group rg_idx declares more rows or more uncompressed `text` bytes
    than `limits` allow; else return the declared size. Metadata only (meta is the FileMetaData pyarrow
    already parsed): no file read."""
    rg = meta.row_group(rg_idx)
    rows = rg.num_rows
    if rows < 0 or rows > limits.max_rows:
        raise CorruptShardError(
            f"{_name(path)}: row group {rg_idx} declares {rows:,} rows, over the cap of {limits.max_rows:,} "
            f"rows per row group: refusing to read it (a decompression bomb or a broken file); if the shard "
            f"is genuine, raise {MAX_ROWS_ENV}")
    j = text_column_index(meta, column) if text_col is None else text_col
    if j is None:
        raise CorruptShardError(f"{_name(path)}: parquet file has no `{column}` column chunk")
    size = rg.column(j).total_uncompressed_size
    if size < 0 or size > limits.max_bytes:
        raise CorruptShardError(
            f"{_name(path)}: row group {rg_idx} declares {size:,} bytes of `{column}` uncompressed, over the cap "
            f"of {limits.max_bytes:,} bytes per row group: refusing to read it (a decompression bomb or a "
            f"broken file); if the shard is genuine, raise {MAX_BYTES_ENV}")
    return size


def decoded_too_big(path, rg_idx, decoded, limits, declared=None):
    """The CorruptShardError for a row group whose `text` decoded to more than limits.max_bytes (so far)."""
    said = f" (its footer declares {declared:,})" if declared is not None else ""
    return CorruptShardError(
        f"{_name(path)}: row group {rg_idx} decodes to more than {limits.max_bytes:,} bytes of `text` "
        f"(the cap per row group; {decoded:,} read so far){said}: refusing to read on (a decompression bomb "
        f"or a broken file); if the shard is genuine, raise {MAX_BYTES_ENV}")


def sha256_file(path, *, limit=None, hasher=None):
    """Hex sha256 of a file (or of its first `limit` bytes). Pass hasher= to continue one in place."""
    h = hasher if hasher is not None else hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    mv = memoryview(buf)
    left = limit
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            n = f.readinto(mv if left is None or left >= HASH_CHUNK else mv[:left])
            if not n:
                break
            h.update(mv[:n])
            if left is not None:
                left -= n
    return h.hexdigest()


def check_parquet(path, *, max_row_group_bytes=None, max_row_group_rows=None, text_column=TEXT_COLUMN):
    """Raise CorruptShardError unless path's parquet footer parses, has a string `text_column` column (the
    run's text column: `text` unless --text-column says otherwise), and no row group is over the limits
    (row_group_limits: the arguments, else the process's caps).

    Returns (num_rows, num_row_groups) for callers that want them.
    """
    limits = row_group_limits(max_row_group_bytes, max_row_group_rows)
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptShardError(f"{os.fspath(path)}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if text_column not in schema.names:
        raise SchemaError(f"{os.fspath(path)}: parquet file has no `{text_column}` column "
                                f"(columns: {', '.join(schema.names) or 'none'}; pick the text with "
                                f"--text-column NAME)")
    typ = schema.field(text_column).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise SchemaError(f"{os.fspath(path)}: column `{text_column}` is {typ}, expected a string column "
                          f"(pick the text with --text-column NAME)")
    j = text_column_index(meta, text_column)
    for i in range(meta.num_row_groups):
        check_row_group(path, meta, i, limits, j, text_column)
    return meta.num_rows, meta.num_row_groups


def verify_shard(path, size=None, sha256=None, *, parquet=True, actual_sha256=None, text_column=TEXT_COLUMN):
    """Raise CorruptShardError unless path has `size` bytes, hashes to `sha256` and is a text parquet.

    size / sha256 of None are not checked. actual_sha256 skips re-hashing when the caller already
    hashed the bytes as they were written (fetch does, while streaming).
    """
    path = os.fspath(path)
    try:
        got_size = os.path.getsize(path)
    except OSError as e:
        raise CorruptShardError(f"{path}: cannot be read ({e.strerror or e})") from None
    if size is not None and got_size != size:
        raise CorruptShardError(f"{path}: {got_size} bytes on disk, the source says {size}")
    if sha256 is not None:
        got = actual_sha256 or sha256_file(path)
        if got.lower() != sha256.lower():
            raise CorruptShardError(f"{path}: sha256 {got[:16]}... does not match the source's {sha256[:16]}...")
    if parquet:
        check_parquet(path, text_column=text_column)


def decode_parquet(path):
    """Raise CorruptShardError unless every page of every column of path reads and decompresses (with
    pyarrow's page checksums verified where the writer stored them). Reads one row group at a time, so
    memory stays at one decoded row group (capped by check_parquet, which callers run first)."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptShardError(f"{os.fspath(path)}: a data page does not decode ({type(e).__name__}: {e})") from None
