"""Where each of shardstream's files lives in a data dir: the shards under their file names, and all the
bookkeeping in one hidden folder, so a data dir after a clean stop holds shards and nothing else.

A shard's file name is `source.file_name(i)`: nanochat's shard_XXXXX.parquet, or for a manifest of any
files the cache name (manifest.cache_name: "000003-1f0c2a9b7d3e.parquet", the index and a digest of the
path, never the path). Every name below follows it: NAME.<unique>.partial, NAME.lock, NAME.lease.
`Naming` maps shard ids to names and back (the inventory scan at start).

    DIR/shard_00007.parquet                                  verified, under its final name (nanochat's)
    DIR/shard_00007.parquet.<unique>.partial                 bytes in flight (counted in the budget)
    DIR/.shardstream/shard_00007.parquet.<unique>.partial.json   what that partial belongs to
    DIR/.shardstream/shard_00007.parquet.lock                held while a process fetches the shard
    DIR/.shardstream/shard_00007.parquet.lease               shared-locked while a process's reader holds it
    DIR/.shardstream/status.json, events.jsonl               the downloader's status and event log

Lock and lease files go once nobody needs them (cache.py: a file is removed only while its exclusive
lock is held, and whoever locks one checks it is still the file at the path, so a lock on a removed
file is never trusted). Files an older shardstream left at the top of the dir (`*.lock`, `*.lease`,
`*.partial.json`) are swept by `legacy_files` once nobody holds them.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import is_cache_name
from .shards import SHARD_RE, shard_name

BOOK_DIR = ".shardstream"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
LEGACY_SUFFIXES = (".lock", ".lease", ".partial.json")


def book_dir(data_dir):
    """DIR/.shardstream (not created here: writers call safefs.ensure_book_dir, which refuses a link)."""
    return Path(data_dir) / BOOK_DIR


def _file(shard):
    """A shard's file name: given as one (str), or nanochat's shard_XXXXX.parquet of an id (int)."""
    return shard if isinstance(shard, str) else shard_name(shard)


def lock_path(data_dir, shard):
    """DIR/.shardstream/NAME.lock; shard: its file name, or an id (nanochat's name)."""
    return book_dir(data_dir) / f"{_file(shard)}.lock"


def lease_path(data_dir, shard):
    """DIR/.shardstream/NAME.lease; shard: its file name, or an id (nanochat's name)."""
    return book_dir(data_dir) / f"{_file(shard)}.lease"


def sidecar_path(partial):
    """The sidecar of a partial file DIR/shard_X.parquet.<unique>.partial."""
    partial = Path(partial)
    return book_dir(partial.parent) / f"{partial.name}.json"


def partial_of_sidecar(sidecar):
    """The partial file a sidecar in DIR/.shardstream belongs to."""
    sidecar = Path(sidecar)
    return sidecar.parent.parent / sidecar.name[:-len(".json")]


def status_path(data_dir):
    return book_dir(data_dir) / STATUS_FILE


def events_path(data_dir):
    return book_dir(data_dir) / EVENTS_FILE


def legacy_files(data_dir):
    """Bookkeeping files an older shardstream kept at the top of the data dir (paths)."""
    try:
        names = [e.name for e in Path(data_dir).iterdir()]
    except FileNotFoundError:
        return []
    return [Path(data_dir) / n for n in sorted(names) if n.startswith("shard_") and n.endswith(LEGACY_SUFFIXES)]


# -----------------------------------------------------------------------------
# Names <-> shard ids

PARTIAL_NAME_RE = re.compile(r"^(.+?\.parquet)\.[^/]+\.partial$")   # NAME.<unique>.partial -> NAME


@dataclass(frozen=True)
class Naming:
    """Shard ids <-> file names in a data dir. names None: nanochat's (shard i is shard_XXXXX.parquet, any
    i); else names[i] is shard i's file (`Naming.of(source)`: source.file_name(i) for every id)."""
    names: tuple | None = None
    _ids: dict = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.names is not None:
            object.__setattr__(self, "_ids", {n: i for i, n in enumerate(self.names)})

    @classmethod
    def of(cls, source):
        """The naming of a Source: nanochat's when every name is shard_XXXXX.parquet of its own id (so a
        nanochat data dir is scanned exactly as before), else the source's names."""
        names = tuple(source.file_name(i) for i in range(source.dataset_shards))
        return cls(None if all(n == shard_name(i) for i, n in enumerate(names)) else names)

    def name(self, shard):
        return shard_name(shard) if self.names is None else self.names[shard]

    def shard_of(self, name):
        """The shard id whose file `name` is, or None (not one of this run's files)."""
        if self.names is None:
            m = SHARD_RE.match(name)
            return int(m.group(1)) if m else None
        return self._ids.get(name)

    def partial_shard(self, name):
        """The shard id of a partial file NAME.<unique>.partial of this run, or None."""
        m = PARTIAL_NAME_RE.match(name)
        return self.shard_of(m.group(1)) if m else None

    def foreign(self, name):
        """Whether `name` looks like a shard file shardstream writes (a cache name, shard_XXXXX.parquet, or
        a partial of one) but is none of this run's: left by a run over another file set (a changed
        manifest, another --files). Never adopted under this run's ids (the same index may be another
        file now), and never deleted (it may be another run's, sharing the dir)."""
        m = PARTIAL_NAME_RE.match(name)
        base = m.group(1) if m else name
        if not (is_cache_name(base) or SHARD_RE.match(base)):
            return False
        return self.shard_of(base) is None


def shard_label(source, shard):
    """How logs and messages name shard `shard` of `source`: its file name (nanochat's shard_XXXXX.parquet),
    or for a manifest's file its source path and its cache name: 'sample/10BT/000_00003.parquet
    (000003-1f0c2a9b7d3e.parquet)', so a person finds both the file at the source and the one on disk."""
    name = source.file_name(shard)
    path = source.path(shard)
    return name if path == name else f"{path} ({name})"
