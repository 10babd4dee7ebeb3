"""Where shards live: the URL of a shard, its remote size/sha256/etag, and the auth header.

A Source is a base URL plus the dataset's shard count. `base_url + "/" + shard_name(i)` is the shard.
The default is the Hub's resolve URL of climbmix (HF_ENDPOINT overrides the host). HF_TOKEN is sent as a
bearer token only to the host the token belongs to (the Hub's host, or the host given with token=), and
never appears in a repr, log line or error.

Kinds of source, one per URL form make_source takes:

    https://host/path                   "http"  shards fetched by HTTP (Range resume); cannot be listed
    hf://datasets/ORG/NAME[@REV][/DIR]  "hf"    the Hub: revision pinned to its commit sha, tree API listing
    s3://BUCKET/PREFIX                  "s3"    S3 (or any S3-compatible store) through fsspec + s3fs
    gs://BUCKET/PREFIX                  "gs"    Google Cloud Storage through fsspec + gcsfs
    /a/dir, ./dir, file:///a/dir        "file"  a local directory through fsspec

All but "http" are listed when the Source is made (listing.py): the shard count and every shard's
size/sha256/etag come from the listing and are pinned in `listing`; `revision` (the Hub's commit sha, or
a digest of the listed ETags) goes into identity(), so a resume against changed data fails.
"""
import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .shards import DEFAULT_DATASET, get_dataset, shard_name

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
KINDS = ("http", "hf", "s3", "gs", "file")
OBJECT_STORE_KINDS = ("s3", "gs", "file")      # read through fsspec (objectstore.py), not HTTP


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
    md5: str | None = None  # hex md5 of the bytes when the store gives one (S3's single-part ETag, GCS)
    sha256_from: str | None = field(default=None, compare=False)   # the checksum file sha256 came from
    last_modified: str | None = None    # HTTP Last-Modified: the validator for a resume when no strong ETag


@dataclass(frozen=True)
class Source:
    """A base URL holding shard_XXXXX.parquet files, and how many shards the dataset has.

    For kind "hf" base_url is the Hub's resolve URL at the pinned commit; for s3/gs/file it is the
    s3://, gs:// or file:// URL of the folder. Make one with make_source(url) rather than by hand.
    """
    base_url: str
    dataset_shards: int
    token: str | None = field(default=None, repr=False, compare=False)
    token_host: str | None = None       # the only host the token is ever sent to
    allow_insecure: bool = False        # permit plain http to non-loopback hosts
    kind: str = "http"                  # one of KINDS (see the module docstring)
    revision: str | None = None         # hf: the commit sha; s3/gs/file: "etags-<digest of the listing>"
    listing: tuple = field(default=(), repr=False, compare=False)   # RemoteInfo per shard id, as listed
    storage_options: dict | None = field(default=None, repr=False, compare=False)  # fsspec's (endpoint_url...)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"source kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        p = urlsplit(self.base_url)
        if self.kind in ("http", "hf"):
            if p.scheme not in ("http", "https") or not p.hostname:
                raise ConfigError(f"source {redact_url(self.base_url)!r} is not an http(s) URL: give a base URL "
                                  f"like https://huggingface.co/datasets/<org>/<name>/resolve/main, or one of "
                                  f"hf://datasets/ORG/NAME, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, a local dir")
            if p.scheme == "http" and not self.allow_insecure and not _is_loopback(p.hostname):
                raise ConfigError(f"source {redact_url(self.base_url)!r} uses plain http to a non-loopback host: "
                                  f"use https, or opt out with allow_insecure=True (--allow-insecure)")
        elif p.scheme != self.kind:
            raise ConfigError(f"source {redact_url(self.base_url)!r} is not a {self.kind}:// URL")
        if not isinstance(self.dataset_shards, int) or self.dataset_shards < 2:
            raise ConfigError(f"dataset_shards must be an int >= 2 (train shards + 1 val shard), "
                              f"got {self.dataset_shards!r}")
        if self.listing and len(self.listing) != self.dataset_shards:
            raise ConfigError(f"source {self.name}: the listing holds {len(self.listing)} shards, "
                              f"dataset_shards says {self.dataset_shards}")

    @property
    def name(self):
        """The source as the user writes it, without secrets or revision: hf://datasets/ORG/NAME[/DIR],
        s3://BUCKET/PREFIX, file:///DIR, or the redacted http(s) base URL."""
        if self.kind == "hf":       # <endpoint>/datasets/ORG/NAME/resolve/REV[/DIR]
            parts = urlsplit(self.base_url).path.split("/")
            i = next(i for i in range(len(parts) - 4) if parts[i] == "datasets" and parts[i + 3] == "resolve")
            return "/".join(["hf://datasets", parts[i + 1], parts[i + 2], *parts[i + 5:]]).rstrip("/")
        return redact_url(self.base_url)

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
        """What a resume state records about the source (no secrets). "source" carries the revision (the
        Hub's commit sha, or the digest of the listed ETags), so changed data makes a resume fail."""
        name = f"{self.name}@{self.revision}" if self.revision else self.name
        return {"source": name, "dataset_shards": self.dataset_shards}

    def listed(self, shard_id):
        """The RemoteInfo the listing gave for shard_id when the source was made (None: not listed)."""
        return self.listing[shard_id] if 0 <= shard_id < len(self.listing) else None

    def check_pinned(self, shard_id, info):
        """Hold what the source says now (info) against what it listed when the run started.

        Returns (info with sha256/md5 filled in from the listing, None), or (info, why) when the shard
        changed since: a different size, sha256 or ETag. Unlisted sources pass unchecked.
        """
        pinned = self.listed(shard_id)
        if pinned is None:
            return info, None
        for what in ("size", "sha256", "etag"):
            then, now = getattr(pinned, what), getattr(info, what)
            if then is not None and now is not None and then != now:
                return info, (f"{self.name} changed since this run started: {shard_name(shard_id)} had {what} "
                              f"{then} in the listing, now {now}. Restart from a fresh listing (a resume "
                              f"across the change is refused on purpose)")
        return replace(info, sha256=info.sha256 or pinned.sha256, md5=info.md5 or pinned.md5,
                       size=info.size if info.size is not None else pinned.size), None

    def local_dir(self):
        """The directory of a "file" source (None for the others)."""
        return Path(urlsplit(self.base_url).path) if self.kind == "file" else None

    def check_data_dir(self, data_dir):
        """ConfigError when data_dir is the local source's own folder: eviction would delete the source."""
        d = self.local_dir()
        if d is not None and os.path.realpath(d) == os.path.realpath(data_dir):
            raise ConfigError(f"the data dir {os.fspath(data_dir)!r} is the source's own folder: the downloader "
                              f"deletes shards it has read, so give another --data-dir (or read the folder "
                              f"directly, without a downloader)")


def _is_loopback(host):
    """localhost or a loopback IP literal; a name like 127.0.0.1.example.com is not (DNS sends it anywhere)."""
    host = (host or "").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source_kind(url):
    """Which kind of source a URL names (see the module docstring); ConfigError for other schemes."""
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return "http"
    if scheme in ("hf", "s3", "gs", "file"):
        return scheme
    if scheme == "gcs":
        raise ConfigError(f"source {redact_url(url)!r}: write Google Cloud Storage URLs as gs://BUCKET/PREFIX")
    if scheme:
        raise ConfigError(f"source {redact_url(url)!r}: unknown scheme {scheme}://; give https://..., "
                          f"hf://datasets/ORG/NAME[@REV], s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local dir")
    return "file"


def make_source(url=None, dataset=DEFAULT_DATASET, dataset_shards=None, token=None, allow_insecure=False,
                storage_options=None):
    """Build a Source from user input: url (or SHARDSTREAM_SOURCE, else the Hub URL of `dataset`).

    url: any form in the module docstring. hf://, s3://, gs:// and local dirs are listed now (listing.py):
    the Hub revision is pinned to its commit, and dataset_shards, when None, is the listed count. For an
    http(s) base URL dataset_shards defaults to the known dataset's count. HF_TOKEN (or token=) goes to
    the Hub's host when the source is on the Hub's host; an explicit token= goes to the source's own
    host. storage_options go to fsspec for s3/gs (e.g. {"endpoint_url": ...}; the usual AWS_* / GOOGLE_*
    variables work too).
    """
    url = url or os.environ.get("SHARDSTREAM_SOURCE")
    if url is None:
        url = hub_resolve_url(get_dataset(dataset).repo)
    kind = source_kind(url)
    if kind != "http":
        from .listing import open_listed_source
        return open_listed_source(kind, url, dataset_shards, token=token, allow_insecure=allow_insecure,
                                  storage_options=storage_options)
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
