"""Where shards live: the URL of a shard, its remote size/sha256/etag, and the auth header.

A Source is a base URL plus the dataset's shard count. `base_url + "/" + shard_name(i)` is the shard.
The default is the Hub's resolve URL of climbmix (HF_ENDPOINT overrides the host). HF_TOKEN is sent as a
bearer token only to the host the token belongs to (the Hub's host, or the host given with token=), and
never appears in a repr, log line or error.
"""
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .shards import DEFAULT_DATASET, get_dataset, shard_name

HF_DEFAULT_ENDPOINT = "https://huggingface.co"


def hf_endpoint():
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_resolve_url(repo, revision="main", endpoint=None):
    return f"{(endpoint or hf_endpoint()).rstrip('/')}/datasets/{repo}/resolve/{revision}"


def redact_url(url):
    """A URL safe to print: no user:password, no query string (signed CDN URLs carry secrets there)."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


@dataclass(frozen=True)
class RemoteInfo:
    """What the source says about one shard before we download it."""
    size: int | None        # bytes (X-Linked-Size, else Content-Length)
    sha256: str | None      # hex digest (X-Linked-Etag on the Hub), None when the source gives none
    etag: str | None        # opaque version tag (ETag), used to check a partial file is still valid


@dataclass(frozen=True)
class Source:
    """A base URL holding shard_XXXXX.parquet files, and how many shards the dataset has."""
    base_url: str
    dataset_shards: int
    token: str | None = field(default=None, repr=False, compare=False)
    token_host: str | None = None       # the only host the token is ever sent to
    allow_insecure: bool = False        # permit plain http to non-loopback hosts

    def __post_init__(self):
        p = urlsplit(self.base_url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ConfigError(f"source {redact_url(self.base_url)!r} is not an http(s) URL: give a base URL "
                              f"like https://huggingface.co/datasets/<org>/<name>/resolve/main")
        if p.scheme == "http" and not self.allow_insecure and not _is_loopback(p.hostname):
            raise ConfigError(f"source {redact_url(self.base_url)!r} uses plain http to a non-loopback host: "
                              f"use https, or opt out with allow_insecure=True (--allow-insecure)")
        if not isinstance(self.dataset_shards, int) or self.dataset_shards < 2:
            raise ConfigError(f"dataset_shards must be an int >= 2 (train shards + 1 val shard), "
                              f"got {self.dataset_shards!r}")

    @property
    def val_shard(self):
        return self.dataset_shards - 1

    @property
    def num_train_shards(self):
        return self.dataset_shards - 1

    def url(self, shard_id):
        if not 0 <= shard_id < self.dataset_shards:
            raise ConfigError(f"shard {shard_id} is outside the dataset (0..{self.dataset_shards - 1})")
        return f"{self.base_url.rstrip('/')}/{shard_name(shard_id)}"

    def headers_for(self, url):
        """Request headers for url: Authorization only when url's host is the token's host."""
        if self.token and self.token_host and (urlsplit(url).hostname or "").lower() == self.token_host.lower():
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def identity(self):
        """What a resume state records about the source (no secrets)."""
        return {"source": redact_url(self.base_url), "dataset_shards": self.dataset_shards}


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def make_source(url=None, dataset=DEFAULT_DATASET, dataset_shards=None, token=None, allow_insecure=False):
    """Build a Source from user input: url (or SHARDSTREAM_SOURCE, else the Hub URL of `dataset`).

    dataset_shards defaults to the known dataset's count. HF_TOKEN (or token=) goes to the Hub's host
    when the source is on the Hub's host; an explicit token= goes to the source's own host.
    """
    url = url or os.environ.get("SHARDSTREAM_SOURCE")
    if url is None:
        url = hub_resolve_url(get_dataset(dataset).repo)
    if dataset_shards is None:
        dataset_shards = get_dataset(dataset).num_shards
    host = urlsplit(url).hostname
    hub_host = urlsplit(hf_endpoint()).hostname
    if token is None:
        token = os.environ.get("HF_TOKEN") or None
        token_host = hub_host if (token and host == hub_host) else None
    else:
        token_host = host
    return Source(url.rstrip("/"), int(dataset_shards), token=token, token_host=token_host,
                  allow_insecure=allow_insecure)
