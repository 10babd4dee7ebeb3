"""Shard naming and the datasets we know: `shard_XXXXX.parquet`, the train/val split, default data dirs.

A dataset of T shards has train shards 0..T-2 and one val shard, T-1 (nanochat's convention).
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .settings import nanochat_base_dir as nanochat_base_dir_setting

SHARD_RE = re.compile(r"^shard_(\d{5,})\.parquet$")


@dataclass(frozen=True)
class Dataset:
    """A known dataset on the Hub."""
    name: str            # short name used on the command line
    repo: str            # Hub repo id, e.g. karpathy/climbmix-400b-shuffle
    num_shards: int      # total shards including the val shard (the last one)
    data_subdir: str     # nanochat's directory name under $NANOCHAT_BASE_DIR


DATASETS = {
    "climbmix": Dataset("climbmix", "karpathy/climbmix-400b-shuffle", 6543, "base_data_climbmix"),
    "fineweb-edu": Dataset("fineweb-edu", "karpathy/fineweb-edu-100b-shuffle", 1823, "base_data"),
}
DEFAULT_DATASET = "climbmix"


def get_dataset(name):
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} "
                          f"(or give --source URL and --dataset-shards T for your own)") from None


def shard_name(shard_id):
    """shard_name(3) -> 'shard_00003.parquet'."""
    if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
        raise ConfigError(f"shard id must be a non-negative int, got {shard_id!r}")
    return f"shard_{shard_id:05d}.parquet"


def extract_shard_id(filename):
    """The seed's helper: 'shard_00042.parquet' (or a path to it) -> 42. Raises ValueError otherwise."""
    base = os.path.basename(os.fspath(filename))
    m = SHARD_RE.match(base)
    if not m:
        raise ValueError(f"not a shard file name: {base!r} (expected shard_XXXXX.parquet)")
    return int(m.group(1))


def val_shard_id(dataset_shards):
    return dataset_shards - 1


def train_shard_ids(dataset_shards):
    if dataset_shards < 2:
        raise ConfigError(f"a dataset needs at least 2 shards (train + val), got {dataset_shards}")
    return range(dataset_shards - 1)


def nanochat_base_dir(env=None):
    """nanochat's base dir: $NANOCHAT_BASE_DIR (nanochat decides its data dir by it too), else ~/.cache/nanochat."""
    return Path(nanochat_base_dir_setting(env) or Path.home() / ".cache" / "nanochat")


def default_data_dir(dataset=DEFAULT_DATASET, env=None):
    """nanochat's data dir for `dataset`: $NANOCHAT_BASE_DIR/<data_subdir>. The edges put SHARDSTREAM_DATA_DIR
    before it (settings.py); this does not read it."""
    return nanochat_base_dir(env) / get_dataset(dataset).data_subdir


def list_shards(data_dir):
    """Sorted shard ids of complete-named shard files in data_dir (partials are not listed)."""
    ids = []
    for entry in os.scandir(data_dir):
        m = SHARD_RE.match(entry.name)
        if m and entry.is_file():
            ids.append(int(m.group(1)))
    return sorted(ids)
