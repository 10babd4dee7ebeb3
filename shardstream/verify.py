"""Is this file the shard it claims to be? Size, sha256 and a parquet footer with a `text` column.

Every check raises CorruptShardError naming the file and what was wrong; nothing here deletes or
repairs anything (fetch.py decides that). Only the footer is read, never the data pages, so
check_parquet is cheap even on a 100 MB shard.
"""
import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptShardError

HASH_CHUNK = 1 << 20


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


def check_parquet(path):
    """Raise CorruptShardError unless path's parquet footer parses and has a string `text` column.

    Returns (num_rows, num_row_groups) for callers that want them.
    """
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptShardError(f"{os.fspath(path)}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if "text" not in schema.names:
        raise CorruptShardError(f"{os.fspath(path)}: parquet file has no `text` column "
                                f"(columns: {', '.join(schema.names) or 'none'})")
    typ = schema.field("text").type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise CorruptShardError(f"{os.fspath(path)}: column `text` is {typ}, expected a string column")
    return meta.num_rows, meta.num_row_groups


def verify_shard(path, size=None, sha256=None, *, parquet=True, actual_sha256=None):
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
        check_parquet(path)
