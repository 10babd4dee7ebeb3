"""Where shards live: the URL of a shard, its remote size/sha256/etag, and the auth header.

A Source is a base URL plus the dataset's shard count. `base_url + "/" + shard_name(i)` is the shard.
The default is the Hub's resolve URL of climbmix (HF_ENDPOINT overrides the host). HF_TOKEN is sent as a
bearer token only to the origin the token belongs to: scheme, host and port exactly (HF_ENDPOINT's, or the
source's own with token=), never to another port of the same host; it never appears in a repr, log line
or error.

The URL-safety rules live here: a source URL is checked before any I/O (`check_url`: parses, has a host,
a port in 1-65535, no control characters), the loopback rule for plain http (`_is_loopback`), what a
server-sent URL may be followed to (`follow_problem`: redirects, next-page links), redaction
(`redact_url`) and the token's origin (`url_origin`, `token_headers`).

Kinds of source, one per URL form make_source takes:

    https://host/path                   "http"  shards fetched by HTTP (Range resume); cannot be listed
    hf://datasets/ORG/NAME[@REV][/DIR]  "hf"    the Hub: revision pinned to its commit sha, tree API listing
    s3://BUCKET/PREFIX                  "s3"    S3 (or any S3-compatible store) through fsspec + s3fs
    gs://BUCKET/PREFIX                  "gs"    Google Cloud Storage through fsspec + gcsfs
    /a/dir, ./dir, file:///a/dir        "file"  a local directory through fsspec

All but "http" are listed when the Source is made (listing.py): the shard count and every shard's
size/sha256/etag come from the listing and are pinned in `listing`; `revision` (the Hub's commit sha, or
a digest of the listed ETags) goes into identity(), so a resume against changed data fails.

Two layouts. manifest=None is nanochat's: shard i is `base_url/shard_XXXXX.parquet`, the last one val, and
the data dir holds the same names. With a manifest (manifest.py: any parquet files, picked by globs or a
manifest file) shard i is the manifest's entry i: its URL is the entry's own, else `base_url/<quoted
path>`; its file in the data dir is `manifest.cache_name(i)`; the val shards are the manifest's val
entries (none with --val-files none); identity() carries the manifest's digest. Everything downstream
asks the Source, whatever the layout: `url(i)`, `file_name(i)` (the data dir's name), `path(i)` (what
logs and status show), `val_shards`, `val_shard`, `num_train_shards`.
"""
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from . import settings
from .errors import ConfigError
from .shards import shard_name

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
KINDS = ("http", "hf", "s3", "gs", "file")
OBJECT_STORE_KINDS = ("s3", "gs", "file")      # read through fsspec (objectstore.py), not HTTP
DEFAULT_PORTS = {"http": 80, "https": 443}
URL_FORMS = ("https://HOST[:PORT]/PATH, hf://datasets/ORG/NAME[@REV][/DIR], s3://BUCKET/PREFIX, "
             "gs://BUCKET/PREFIX or a local dir")
_HOST_RE = re.compile(r"[\w-]+(\.[\w-]+)*\.?")     # a DNS name (IDNA letters too); IP literals apart
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def hf_endpoint(env=None):
    """$HF_ENDPOINT (the Hub's own variable), else the Hub."""
    return (settings.hf_endpoint(env) or HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_resolve_url(repo, revision="main", endpoint=None):
    return f"{(endpoint or hf_endpoint()).rstrip('/')}/datasets/{repo}/resolve/{revision}"


def redact_url(url):
    """A URL safe to print: no user:password, no query string (signed CDN URLs carry secrets there).
    A malformed URL is shown as written, less those parts, so an error can name it."""
    url = str(url)
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError:
        bare = re.split(r"[?#]", url, maxsplit=1)[0]
        return _CONTROL_RE.sub("?", re.sub(r"^([^:/?#]*://)[^/?#]*@", r"\1", bare))
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"          # an IPv6 literal keeps its brackets
    if port is not None:
        host = f"{host}:{port}"
    text = f"{p.scheme}://{host}{p.path}" if "://" in url else urlunsplit((p.scheme, host, p.path, "", ""))
    return _CONTROL_RE.sub("?", text)


def url_problem(url):
    """What makes url unfit to connect to over http(s), in words, or None: not parseable, no host, a host
    that is no DNS name or IP address, a port outside 1-65535, control characters (urlsplit would drop
    some silently, so the URL used would not be the one given)."""
    if _CONTROL_RE.search(url):
        return "it contains control characters (percent-encode them)"
    try:
        p = urlsplit(url)
    except ValueError as e:
        return f"it is not a valid URL ({e})"
    if p.scheme.lower() not in DEFAULT_PORTS:
        return "it is not an http(s) URL"
    if not p.hostname:
        return "it has no host"
    if not _valid_host(p.hostname):
        return f"{p.hostname!r} is not a host name or IP address"
    try:
        port = p.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raw = p.netloc.rpartition("@")[2].rpartition("]")[2].rpartition(":")[2]
        return f"port {raw!r} is not a port number in 1-65535 (leave it out for the scheme's default)"
    return None


def _valid_host(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.fullmatch(host))


def check_url(url, what="source"):
    """ConfigError, naming url and the forms expected, when a source URL cannot be used (before any I/O):
    for http(s) see url_problem; s3://, gs:// must parse and name a bucket. Returns urlsplit(url)."""
    shown = redact_url(url)
    try:
        p = urlsplit(url)
    except ValueError as e:
        raise ConfigError(f"{what} {shown!r} is not a valid URL ({e}): give {URL_FORMS}") from None
    scheme = p.scheme.lower()
    if scheme in DEFAULT_PORTS:
        why = url_problem(url)
        if why:
            raise ConfigError(f"{what} {shown!r}: {why}; give a URL like {URL_FORMS}")
    elif scheme in ("s3", "gs") and not p.netloc:
        raise ConfigError(f"{what} {shown!r} names no bucket: write {scheme}://BUCKET/PREFIX")
    return p


def follow_problem(url, allow_insecure=False):
    """Why a URL a server sent (a redirect, a next-page link) may not be followed, as words that read
    after "refused a redirect to", or None when it may: http(s) only, well-formed (url_problem), and plain
    http only to loopback unless allow_insecure."""
    shown = redact_url(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in DEFAULT_PORTS:
        return f"a non-http(s) URL ({shown})"
    why = url_problem(url)
    if why:
        return f"a malformed URL ({shown}: {why})"
    if scheme == "http" and not allow_insecure and not _is_loopback(urlsplit(url).hostname):
        return (f"plain http on a non-loopback host ({shown}): https is required unless you opt out with "
                f"--allow-insecure")
    return None


def follow_target(base, link, allow_insecure=False):
    """(the URL a server-sent link (a redirect's Location, a next-page link) names, resolved against the
    URL that sent it; follow_problem's words, or None when it may be followed)."""
    try:
        target = urljoin(base, link)
    except ValueError:
        target = link
    return target, follow_problem(target, allow_insecure)


def url_origin(url):
    """'scheme://host:port' of an http(s) URL with the port filled in from the scheme (https://h and
    https://h:443 are one origin); None for anything else, a malformed URL or port 0."""
    try:
        p = urlsplit(url)
        port = p.port
    except (ValueError, TypeError, AttributeError):
        return None
    scheme = p.scheme.lower()
    if scheme not in DEFAULT_PORTS or not p.hostname or port == 0:
        return None
    host = f"[{p.hostname}]" if ":" in p.hostname else p.hostname
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}"


def token_headers(token, token_origin, url):
    """{"Authorization": "Bearer <token>"} when url is at exactly token_origin (scheme, host and port;
    see url_origin), else {}: another port of the same host is another server."""
    origin = url_origin(url) if token and token_origin else None
    if origin is not None and origin == url_origin(token_origin):
        return {"Authorization": f"Bearer {token}"}
    return {}


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
    """A base URL holding the shards, and how many there are: shard_XXXXX.parquet files (manifest None),
    or the files a Manifest names (see the module docstring).

    For kind "hf" base_url is the Hub's resolve URL at the pinned commit; for s3/gs/file it is the
    s3://, gs:// or file:// URL of the folder. Make one with make_source(url) rather than by hand.
    With a manifest, dataset_shards may be None (it is len(manifest)) and listing may be () (it is made
    from the entries' size/sha256/etag, so check_pinned holds each file to what the manifest pinned).
    """
    base_url: str
    dataset_shards: int
    token: str | None = field(default=None, repr=False, compare=False)
    token_host: str | None = None       # the token's host (a bare host means the base URL's origin, if it
                                        # is on that host, else https://host); kept in step with token_origin
    allow_insecure: bool = False        # permit plain http to non-loopback hosts
    kind: str = "http"                  # one of KINDS (see the module docstring)
    revision: str | None = None         # hf: the commit sha; s3/gs/file: "etags-<digest of the listing>"
    listing: tuple = field(default=(), repr=False, compare=False)   # RemoteInfo per shard id, as listed
    storage_options: dict | None = field(default=None, repr=False, compare=False)  # fsspec's (endpoint_url...)
    token_origin: str | None = field(default=None, compare=False)  # the only origin (scheme://host:port)
                                        # the token is ever sent to; from token_host when not given
    manifest: "manifest.Manifest | None" = field(default=None, repr=False)   # None: nanochat's numbered layout
                                        # (not imported: source.py stays a leaf; a Manifest is checked by shape)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"source kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        p = check_url(self.base_url)
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
        if self.manifest is not None:
            self._check_manifest()
        elif not isinstance(self.dataset_shards, int) or self.dataset_shards < 2:
            raise ConfigError(f"dataset_shards must be an int >= 2 (train shards + 1 val shard), "
                              f"got {self.dataset_shards!r}")
        if self.listing and len(self.listing) != self.dataset_shards:
            raise ConfigError(f"source {self.name}: the listing holds {len(self.listing)} shards, "
                              f"dataset_shards says {self.dataset_shards}")
        origin = self.token_origin or self._origin_of_token_host()
        if origin is not None and url_origin(origin) is None:
            raise ConfigError(f"token_origin {redact_url(origin)!r} is not an http(s) origin: write "
                              f"scheme://host[:port], e.g. https://huggingface.co")
        object.__setattr__(self, "token_origin", url_origin(origin) if origin else None)
        if self.token_origin and not self.token_host:
            object.__setattr__(self, "token_host", urlsplit(self.token_origin).hostname)

    def _check_manifest(self):
        """dataset_shards and listing follow the manifest; an entry's own URL must be one this kind of
        source reads (http(s) for http/hf, the same scheme for s3/gs/file), checked like base_url."""
        m = self.manifest
        if not all(hasattr(m, a) for a in ("train", "val", "entries", "val_ids", "cache_name", "digest")):
            raise ConfigError(f"manifest must be a manifest.Manifest (or None), got {type(m).__name__}")
        if not m.train:
            raise ConfigError(f"source {self.name}: the manifest holds no train files")
        if self.dataset_shards is None:
            object.__setattr__(self, "dataset_shards", len(m))
        if self.dataset_shards != len(m):
            raise ConfigError(f"source {self.name}: dataset_shards={self.dataset_shards!r} but the manifest "
                              f"holds {len(m)} files: leave dataset_shards out with a manifest")
        if not self.listing:
            object.__setattr__(self, "listing", tuple(RemoteInfo(e.size, e.sha256, e.etag) for e in m.entries))
        schemes = ("http", "https") if self.kind in ("http", "hf") else (self.kind,)
        for i, e in enumerate(m.entries):
            if e.url is None:
                continue
            p = check_url(e.url, what=f"manifest entry {i}")
            if p.scheme.lower() not in schemes:
                raise ConfigError(f"manifest entry {i} ({redact_url(e.url)}) is a {p.scheme}:// URL, but the "
                                  f"source {self.name} reads {' or '.join(s + '://' for s in schemes)} URLs: "
                                  f"write it relative to the source, or use a source of its kind")
            if p.scheme.lower() == "http" and not self.allow_insecure and not _is_loopback(p.hostname):
                raise ConfigError(f"manifest entry {i} ({redact_url(e.url)}) uses plain http to a non-loopback "
                                  f"host: use https, or opt out with allow_insecure=True (--allow-insecure)")

    def _origin_of_token_host(self):
        """token_host as an origin: itself when it is one, the base URL's origin when that is on the
        host, else https on the host (the default port)."""
        host = self.token_host
        if not host:
            return None
        if "://" in host:
            return host
        if (urlsplit(self.base_url).hostname or "") == host.lower() and url_origin(self.base_url):
            return url_origin(self.base_url)
        return f"https://{host}"

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
    def val_shards(self):
        """The val shard ids: the manifest's val entries (() with --val-files none), else the last shard."""
        return self.manifest.val_ids if self.manifest is not None else (self.dataset_shards - 1,)

    @property
    def val_shard(self):
        """The first val shard id, None when there is none (a manifest with --val-files none)."""
        return self.val_shards[0] if self.val_shards else None

    @property
    def num_train_shards(self):
        """Train shards are 0..num_train_shards-1 (the val shards come after them)."""
        return len(self.manifest.train) if self.manifest is not None else self.dataset_shards - 1

    def _check_id(self, shard_id):
        if not 0 <= shard_id < self.dataset_shards:
            raise ConfigError(f"shard {shard_id} is outside the dataset (0..{self.dataset_shards - 1})")

    def url(self, shard_id):
        """Where shard_id is read from: base_url/shard_XXXXX.parquet, or the manifest entry's URL, else
        base_url/<its path> (percent-quoted for http(s); fsspec takes paths as they are)."""
        self._check_id(shard_id)
        if self.manifest is None:
            return f"{self.base_url.rstrip('/')}/{shard_name(shard_id)}"
        entry = self.manifest.entries[shard_id]
        if entry.url is not None:
            return entry.url
        path = quote(entry.path, safe="/") if self.kind in ("http", "hf") else entry.path
        return f"{self.base_url.rstrip('/')}/{path}"

    def file_name(self, shard_id):
        """Shard shard_id's file name in the data dir: shard_XXXXX.parquet, or the manifest's cache name
        (never a path: see manifest.cache_name)."""
        self._check_id(shard_id)
        return shard_name(shard_id) if self.manifest is None else self.manifest.cache_name(shard_id)

    def path(self, shard_id):
        """Shard shard_id as status lines and logs name it: its path in the source (a manifest entry's
        redacted URL when it has one), else shard_XXXXX.parquet."""
        self._check_id(shard_id)
        if self.manifest is None:
            return shard_name(shard_id)
        entry = self.manifest.entries[shard_id]
        return redact_url(entry.url) if entry.url is not None else entry.path

    def headers_for(self, url):
        """Request headers for url: Authorization only when url is at exactly the token's origin (scheme,
        host and port), so a redirect or link to another port of the same host gets none."""
        return token_headers(self.token, self.token_origin, url)

    def identity(self):
        """What a resume state records about the source (no secrets). "source" carries the revision (the
        Hub's commit sha, or the digest of the listed ETags), so changed data makes a resume fail; with a
        manifest it carries the manifest's digest too ("...#manifest-<digest>"), so a resume against another
        file set (or a changed file) fails as well. Without a manifest it is what it always was, so the
        resume states written before manifests existed still match."""
        name = f"{self.name}@{self.revision}" if self.revision else self.name
        if self.manifest is None:
            return {"source": name, "dataset_shards": self.dataset_shards}
        digest = self.manifest.digest()
        return {"source": f"{name}#manifest-{digest}", "dataset_shards": self.dataset_shards, "manifest": digest}

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
                return info, (f"{self.name} changed since this run started: {self.path(shard_id)} had {what} "
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
    """Which kind of source a URL names (see the module docstring); ConfigError for other schemes and for a
    URL that cannot be used (check_url), before any I/O."""
    scheme = check_url(url).scheme.lower() if "://" in url else ""
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
