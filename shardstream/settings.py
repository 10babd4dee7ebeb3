"""Every environment variable shardstream reads: one table of SHARDSTREAM_* settings, and the foreign ones.

The edges (the CLI, the reference trainer, the drop-in loader of docs/NANOCHAT.md) read settings here and
pass them on as arguments; library code takes explicit arguments whose defaults are constants, so a bare
`StreamingDownloader()` is the same whatever the shell exports. This is the one module that reads
os.environ for settings (tests/test_settings.py checks it, and that docs/NANOCHAT.md's table is SETTINGS).

    read("SHARDSTREAM_WORKERS")                  # 2 when unset; ConfigError naming the variable when bad
    read_all(["SHARDSTREAM_SOURCE", ...], env)   # {name: value}, or one ConfigError listing every bad one
    unknown_variables(env)                       # [(typo, closest real name or None)]

A leaf: it imports nothing of ours beyond errors and units (source.py, shards.py import it).
"""
import difflib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .units import parse_bytes

logger = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
# shards.DATASETS and fetch.VERIFY_LEVELS (this module cannot import them; a test checks they agree)
DATASET_NAMES = ("climbmix", "fineweb-edu")
VERIFY_LEVELS = ("footer", "decode")

# where a variable applies (Setting.where)
DROP_IN, CLI, TRAINER, TORCHRUN, RUN_SCRIPT = "drop-in", "CLI", "trainer", "torchrun", "./run"


@dataclass(frozen=True)
class Setting:
    """One SHARDSTREAM_* variable: `parse(text)` turns its stripped, non-empty value into `default`'s kind
    (raising ValueError or ConfigError); unset or empty means `default`. `shown` is the default as
    docs/NANOCHAT.md writes it, `hint` says what to write instead of a bad value."""
    name: str
    parse: Callable[[str], Any] | None      # None: read by the shell (./run), never by Python
    default: Any
    shown: str
    doc: str
    hint: str
    where: tuple[str, ...]


def _flag(s):
    if s.lower() in TRUE:
        return True
    if s.lower() in FALSE:
        return False
    raise ValueError(s)


def _int_at_least(lo, extra=None):
    def parse(s):
        if extra and s.lower() in extra:
            return extra[s.lower()]
        v = int(s)
        if v < lo:
            raise ValueError(s)
        return v
    return parse


def _one_of(choices):
    def parse(s):
        if s.lower() not in choices:
            raise ValueError(s)
        return s.lower()
    return parse


def _seconds_or_off(s):
    if s.lower() in ("off", "none", "-1"):
        return None
    v = float(s)
    if not 0 <= v < float("inf"):
        raise ValueError(s)
    return v


def _positive_seconds(s):
    v = float(s)
    if not 0 < v < float("inf"):
        raise ValueError(s)
    return v


def _budget(s):
    return None if s.lower() in ("none", "0", "-1") else parse_bytes(s)


def _floor(s):
    return 0 if s == "0" else parse_bytes(s)


def _globs(s):
    """Globs separated by ';' or newlines (a comma may sit inside a glob's [...] class, or a file name)."""
    out = [g.strip() for g in s.replace("\n", ";").split(";") if g.strip()]
    if not out:
        raise ValueError(s)
    return out


def _column(s):
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise ValueError(s)
    return s


def _process(s):
    return "auto" if s.lower() == "auto" else _flag(s)


def _positive_int(s):
    v = int(s)              # whole digits only: '512MB', '1e400', 'inf' are refused
    if v <= 0:
        raise ValueError(s)
    return v


_ALL = (DROP_IN, CLI, TRAINER)
SETTINGS = (
    Setting("SHARDSTREAM_STREAMING", _flag, False, "`0`",
            "`1` turns streaming on for loaders called without `streaming_downloader=`",
            "write 1 to stream shards (or 0 / leave it unset to read a local data dir)", (DROP_IN,)),
    Setting("SHARDSTREAM_SOURCE", str, None, "the Hub URL of the dataset",
            "where the shards live: `https://…/resolve/main`, `hf://datasets/ORG/NAME`, `s3://BUCKET/PREFIX`, "
            "`gs://…`, a local dir", "write a URL or a local dir", _ALL),
    Setting("SHARDSTREAM_DATASET", _one_of(DATASET_NAMES), "climbmix", "`climbmix`",
            "`climbmix` or `fineweb-edu`: sets the default source, the shard count, and the data dir name",
            f"choose one of {', '.join(DATASET_NAMES)} (or set SHARDSTREAM_SOURCE and SHARDSTREAM_DATASET_SHARDS "
            f"for another dataset)", (DROP_IN, CLI)),
    Setting("SHARDSTREAM_DATASET_SHARDS", _int_at_least(2), None,
            "the listed count, or the dataset's for its own Hub URL",
            "shards in the dataset, val shard included. An `https://` source cannot be listed, so it needs this, "
            "unless it is the dataset's own Hub resolve URL (the default source is). Without it the first loader "
            "call fails before any request, saying so",
            "write the number of shards in the dataset, val shard included (an int >= 2)", (DROP_IN,)),
    Setting("SHARDSTREAM_FILES", _globs, None, "nanochat's `shard_XXXXX.parquet`, else every `**/*.parquet`",
            "the train files of a listed source: globs over the paths under it, separated by `;` or newlines "
            "(`sample/10BT/*.parquet`, `data/**/*.parquet`; `**` any depth, `*` within a folder). The data dir "
            "then holds each file under a cache name (index + a digest of its path)",
            "write one glob or several separated by ';', like sample/10BT/*.parquet;data/**/*.parquet", _ALL),
    Setting("SHARDSTREAM_VAL_FILES", str, None, "the last file",
            "the val files: a glob (taken out of the train files), or `none` for no val",
            "write a glob like data/val/*.parquet, or none", _ALL),
    Setting("SHARDSTREAM_MANIFEST", str, None, "none",
            "the path of a manifest file: one path relative to the source (or one absolute URL) per line, `#` "
            "comments; the way to read other files than `shard_XXXXX.parquet` from an `https://` source",
            "write the path of a text file naming one file per line", _ALL),
    Setting("SHARDSTREAM_TEXT_COLUMN", _column, "text", "`text`",
            "the parquet column holding the documents", "write a column name", _ALL),
    Setting("SHARDSTREAM_DATA_DIR", str, None, "`$NANOCHAT_BASE_DIR/base_data_climbmix`",
            "the cache dir (nanochat's data dir)", "write a directory", _ALL),
    Setting("SHARDSTREAM_MAX_CACHE_BYTES", _budget, None, "none",
            "disk budget: `20GB`, `500MB`, `1.5GiB` or a byte count. Shard files, partial downloads, and space "
            "reserved for downloads in flight all count against it",
            "write a disk budget like 20GB, 500MB, 1.5GiB or 20000000000 (none or unset: no budget)", (DROP_IN,)),
    Setting("SHARDSTREAM_BUFFER_SIZE", _int_at_least(1, {"auto": "auto"}), 5, "`5`",
            "train shards kept ready ahead of the reader, or `auto` (sized from the measured download and read "
            "rates)", "write the number of shards to keep ready ahead of the reader (an int >= 1), or auto",
            (DROP_IN,)),
    Setting("SHARDSTREAM_TOTAL_SHARDS", _int_at_least(1, {"-1": -1, "all": -1}), -1, "`-1` (all)",
            "train shards to stream (0…N−1) before wrapping around to shard 0; the val shard is fetched besides. "
            "The trainer's `--streaming_total_shards` and `StreamingDownloader(total_shards=)` count the same "
            "way. The dataset's full count (val shard included) is refused with a message saying so",
            "write the number of train shards to stream (an int >= 1; the val shard comes besides), or -1 for all",
            (DROP_IN,)),
    Setting("SHARDSTREAM_RETAIN", _int_at_least(0), 0, "`0`", "consumed shards kept behind the reader",
            "write an int >= 0", (DROP_IN,)),
    Setting("SHARDSTREAM_WORKERS", _int_at_least(1), 2, "`2`", "parallel downloads",
            "write an int >= 1 (parallel downloads)", (DROP_IN,)),
    Setting("SHARDSTREAM_FAILURE_POLICY", _one_of(("fail", "wait", "skip")), "fail", "`fail`",
            "what to do when a shard cannot be fetched: `fail`, `wait` or `skip`", "write fail, wait or skip",
            (DROP_IN,)),
    Setting("SHARDSTREAM_MIN_FREE_BYTES", _floor, None, "`1GB`", "free-disk floor: no download goes below it",
            "write a byte count like 1GB or 500MB (0: no floor)", (DROP_IN,)),
    Setting("SHARDSTREAM_PARTITION", _one_of(("global", "node")), "global", "`global`",
            "under torchrun: `global` (nanochat's order) or `node` (each node reads 1/N of the shards)",
            "write global (every node reads every shard) or node (1/N of the shards per node)", (DROP_IN,)),
    Setting("SHARDSTREAM_SCOPE", _one_of(("node", "cluster")), "node", "`node`",
            "under torchrun: `node` (one downloader per node) or `cluster` (one per job, for a shared cache dir)",
            "write node (one downloader per node) or cluster (one per job, shared cache dir)", (DROP_IN,)),
    Setting("SHARDSTREAM_STATUS_EVERY", _seconds_or_off, 0.0, "`0`",
            "seconds between `[Streaming]` status lines (`0`: at every new shard; `off`: none)",
            "write seconds >= 0 between [Streaming] lines (0: every new shard), or off", (DROP_IN,)),
    Setting("SHARDSTREAM_REQUIRE_CHECKSUM", _flag, False, "`0`",
            "`1` refuses a shard the source gives no sha256/md5 for (a plain `https://` URL without a "
            "`SHA256SUMS`); `0` checks such shards by size and parquet footer",
            "write 1 to refuse shards without a sha256/md5 at the source, or 0", (DROP_IN,)),
    Setting("SHARDSTREAM_VERIFY", _one_of(VERIFY_LEVELS), "footer", "`footer`",
            "`footer`: size, the checksum when there is one, the parquet footer; `decode`: also read and "
            "decompress every page before a shard is used (catches a flipped byte inside a page when there is "
            "no checksum)", f"write {' or '.join(VERIFY_LEVELS)}", (DROP_IN,)),
    Setting("SHARDSTREAM_FETCH_PROCESS", _process, "auto", "`auto`",
            "where downloads run: `auto` puts shards of 16 MB or more in one helper process (out of the "
            "training process's interpreter lock, at a lower CPU priority) once it is up; `1` every shard "
            "there; `0` every shard in the training process's threads",
            "write auto, 1 or 0", (DROP_IN,)),
    # None: the library's own default (verify.DEFAULT_MAX_ROW_GROUP_*, torchrun.DEFAULT_TIMEOUT)
    Setting("SHARDSTREAM_MAX_ROW_GROUP_BYTES", _positive_int, None, "`536870912` (512 MiB)",
            "the most `text` bytes one row group may hold (a cap against decompression bombs); raise it for "
            "genuine bigger row groups", "write a positive integer (a number of bytes)", _ALL),
    Setting("SHARDSTREAM_MAX_ROW_GROUP_ROWS", _positive_int, None, "`1048576`",
            "the most rows one row group may hold", "write a positive integer (a number of rows)", _ALL),
    Setting("SHARDSTREAM_DIST_TIMEOUT", _positive_seconds, None, "`300`",
            "seconds a silent rank is waited for (docs/DISTRIBUTED.md)", "write a number of seconds > 0",
            (DROP_IN, TRAINER, TORCHRUN)),
    Setting("SHARDSTREAM_SHARE_STATE", _flag, True, "`1`",
            "under torchrun: `1` puts every rank's loader cursor in rank 0's `state_dict` (exact DDP resume); "
            "`0` keeps each rank's own", "write 1 or 0", (DROP_IN, TORCHRUN)),
    Setting("SHARDSTREAM_TORCH", None, None, "`torch==2.13.0`",
            "read by `./run` only: the pip spec of the torch it installs (e.g. a CUDA build)",
            "write a pip requirement, e.g. torch==2.13.0", (RUN_SCRIPT,)),
)
BY_NAME = {s.name: s for s in SETTINGS}


def markdown_rows():
    """docs/NANOCHAT.md's table rows, one per setting (`python -c 'from shardstream.settings import
    markdown_rows; print(*markdown_rows(), sep="\\n")'` regenerates them)."""
    return [f"| `{s.name}` | {s.shown} | {s.doc} |" for s in SETTINGS]

# Variables of other tools that shardstream honours, read through the functions below
FOREIGN = {
    "HF_TOKEN": "the Hub token (sent only to the Hub's host)",
    "HF_ENDPOINT": "the Hub's host",
    "HF_HUB_OFFLINE": "the Hub: no requests (1/on/yes/true)",
    "HF_HOME": "the Hub's cache dir (its saved token is under it)",
    "HF_TOKEN_PATH": "the Hub: the saved token's file",
    "XDG_CACHE_HOME": "the cache base HF_HOME defaults under",
    "NANOCHAT_BASE_DIR": "nanochat's base dir (its data dir is under it)",
    "RANK": "torchrun", "WORLD_SIZE": "torchrun", "LOCAL_RANK": "torchrun", "LOCAL_WORLD_SIZE": "torchrun",
    "GROUP_RANK": "torchrun", "MASTER_ADDR": "torchrun", "MASTER_PORT": "torchrun",
    "TORCHELASTIC_RUN_ID": "torchrun", "TORCHELASTIC_RESTART_COUNT": "torchrun",
}
TORCHRUN_NAMES = tuple(k for k, v in FOREIGN.items() if v == "torchrun")


def _env(env):
    return os.environ if env is None else env


def _setting(name):
    s = BY_NAME.get(name)
    if s is None or s.parse is None:
        raise KeyError(f"{name} is not a setting shardstream reads (settings.SETTINGS lists them)")
    return s


def _parse(s, raw):
    """(value, None), or (default, the problem as one line naming the variable and what to write)."""
    if raw is None or raw.strip() == "":
        return s.default, None
    try:
        return s.parse(raw.strip()), None
    except ConfigError as e:            # parse_bytes says what is wrong with the value
        return s.default, f"{s.name}={raw!r}: {e}; {s.hint}"
    except (ValueError, KeyError, TypeError, OverflowError):
        return s.default, f"{s.name}={raw!r}: {s.hint}"


def read(name, env=None):
    """The setting's value from env (default os.environ): its default when unset or empty; ConfigError naming
    the variable, its value and what to write when bad."""
    value, problem = _parse(_setting(name), _env(env).get(name))
    if problem:
        raise ConfigError(problem)
    return value


def read_all(names=None, env=None, what="bad settings in the environment"):
    """{name: value} for names (default every setting Python reads), or one ConfigError listing every bad one."""
    env = _env(env)
    names = [s.name for s in SETTINGS if s.parse is not None] if names is None else names
    values, problems = {}, []
    for name in names:
        values[name], problem = _parse(_setting(name), env.get(name))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(f"{what} (docs/NANOCHAT.md lists them):\n  " + "\n  ".join(problems))
    return values


def unknown_variables(env=None):
    """[(name, closest known name or None)] for every SHARDSTREAM_* name in env that is not in SETTINGS."""
    env = _env(env)
    n = len("SHARDSTREAM_")        # compared without the prefix every name shares, which would match anything
    tails = {name[n:]: name for name in BY_NAME}
    return [(name, next((tails[t] for t in difflib.get_close_matches(name[n:], tails, n=1)), None))
            for name in sorted(k for k in env if k.startswith("SHARDSTREAM_") and k not in BY_NAME)]


def warn_unknown(env=None, log=logger, prefix="[shardstream]"):
    """Log a warning per unknown SHARDSTREAM_* name (a typo), with the closest real name."""
    for name, close in unknown_variables(env):
        log.warning(f"{prefix} {name} is not a shardstream variable and is ignored"
                    + (f" (did you mean {close}?)" if close else ""))


# -----------------------------------------------------------------------------------------------------
# Foreign variables

def foreign(name, env=None):
    """A foreign variable's value (FOREIGN), None when unset or empty."""
    if name not in FOREIGN:
        raise KeyError(f"{name} is not a variable shardstream reads (settings.FOREIGN lists them)")
    return _env(env).get(name) or None


def hf_token(env=None):
    return foreign("HF_TOKEN", env)


def hf_endpoint(env=None):
    """HF_ENDPOINT as set (None when unset); source.hf_endpoint() adds the Hub's default."""
    return foreign("HF_ENDPOINT", env)


def nanochat_base_dir(env=None):
    """NANOCHAT_BASE_DIR as set (None when unset); shards.nanochat_base_dir() adds nanochat's default."""
    return foreign("NANOCHAT_BASE_DIR", env)


def torchrun_env(env=None):
    """{name: value} of torchrun's variables that are set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)."""
    env = _env(env)
    return {k: env[k] for k in TORCHRUN_NAMES if k in env}
