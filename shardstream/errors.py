"""The exceptions shardstream raises. Each names the thing that failed and what to do about it."""


class ShardStreamError(Exception):
    """Base class of every error shardstream raises on purpose."""


class ConfigError(ShardStreamError, ValueError):
    """A bad argument or setting (bad buffer size, unwritable directory, malformed URL...)."""


class FetchError(ShardStreamError):
    """A shard could not be brought to disk. Carries shard id, URL (token-free), attempts, cause."""

    def __init__(self, message, *, shard_id=None, url=None, attempts=0, cause=None):
        super().__init__(message)
        self.shard_id = shard_id
        self.url = url
        self.attempts = attempts
        self.cause = cause


class TransientFetchError(FetchError):
    """A failure worth retrying (reset, 5xx, 429, stall, truncation, checksum mismatch once)."""


class PermanentFetchError(FetchError):
    """A failure retrying cannot fix (404, 401/403, size or checksum that never matches)."""


class SourceUnreachable(TransientFetchError):
    """A fetch gave up on a server that has not answered once in this process (no network, a wrong
    HF_ENDPOINT or --source); the message says what to do. (Within seconds of the first tries the same
    advice is logged once at ERROR, while the retries go on.)"""


class CorruptShardError(ShardStreamError):
    """A file on disk is not the shard it claims to be (size, sha256 or parquet layout wrong)."""


class SchemaError(CorruptShardError):
    """A readable parquet file without the run's text column, or with it not a string column: the file's
    own schema, so fetching it again cannot help (--text-column NAME picks the column)."""


class DiskSpaceError(ShardStreamError):
    """Free disk space fell under the configured floor, or a budget cannot hold what is needed."""


class ShardWaitTimeout(ShardStreamError, TimeoutError):
    """A reader waited longer than allowed for a shard."""


class StateMismatchError(ShardStreamError, ValueError):
    """A resume state does not belong to this run (other source, geometry, tokenizer...)."""


class ShardSkipped(ShardStreamError):
    """The failure policy is "skip" and this shard could not be fetched: the reader should move on."""

    def __init__(self, message, *, shard_id=None, cause=None):
        super().__init__(message)
        self.shard_id = shard_id
        self.cause = cause


class DownloaderCrashed(ShardStreamError):
    """A background download worker died of an unexpected error (chained as __cause__)."""


class DownloaderStopped(ShardStreamError):
    """The downloader was stopped (or never started) while a reader asked it for a shard."""


class FetchCancelled(FetchError):
    """A fetch was stopped (its stop event was set); the partial file is left to resume later."""


class RankLost(ShardStreamError):
    """Another process of a distributed job (the node leader, a local rank) died, hangs, or never showed up."""


class UnsafePathError(ConfigError):
    """Something in the data dir is not what shardstream may write or commit to: a symbolic link planted
    under one of its bookkeeping names, or a directory (or other non-file) under a shard's final name."""
