"""Discovery and pinning: list a source's shards when a Source is made, and `shardstream ls SOURCE`.

    source = make_source("s3://bucket/corpus")      # -> open_listed_source("s3", ...)
    source.dataset_shards                           # the listed count: no --dataset-shards to type
    source.listing[7]                               # RemoteInfo(size, sha256, etag, md5) as listed
    source.identity()                               # {"source": "s3://bucket/corpus@etags-1f0c...", ...}

hf://datasets/ORG/NAME[@REV][/DIR]: the revision (default main) is resolved to its commit sha once, and
every URL names that sha, so the data cannot change under a run; the tree API gives sizes and sha256.
s3://, gs://, local dirs: the folder is listed through fsspec (objectstore.py); the revision is a digest
of the listed names, sizes and ETags. Either way the revision goes into Source.identity(), which resume
fingerprints hold, and every fetch holds the shard against the listing (Source.check_pinned).

The shards must be shard_00000.parquet .. shard_{T-1}.parquet with no gap (the last one is val); other
files are ignored, and so are lookalikes such as shard_000003.parquet (shard 3 is read from
shard_00003.parquet, so no other file's size may be pinned for it). dataset_shards=T given by hand uses
the first T (it may not exceed the listing).
A listing is untrusted input: a name that is not a plain file name (a path step, a separator, a control
character) or a size that is no non-negative int is a ConfigError, for every kind of source; hub.py
checks the Hub's answers themselves (paging, entries).
Plain http(s) base URLs cannot be listed: their count is the known dataset's (make_source).
"""
import argparse
import hashlib
import logging
import os
import re
from urllib.parse import urlsplit

from .errors import ConfigError
from .settings import hf_token, read
from .shards import DATASETS, DEFAULT_DATASET, SHARD_RE, get_dataset, shard_name
from .source import (HF_DEFAULT_ENDPOINT, Source, _is_loopback, hf_endpoint, hub_resolve_url, redact_url,
                     source_kind, url_origin, url_problem)

logger = logging.getLogger(__name__)

MAX_LISTED_GAPS = 5             # missing shard ids named in the error
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_RESOLVE_RE = re.compile(r"^/datasets/([^/]+)/([^/]+)/resolve/([^/]+)(/.*)?$")


def open_listed_source(kind, url, dataset_shards=None, *, token=None, allow_insecure=False, storage_options=None):
    """A Source of kind hf/s3/gs/file, listed and pinned now (see the module docstring)."""
    if kind == "hf":
        from .hub import list_tree, parse_hf_url, resolve_revision
        repo, revision, folder = parse_hf_url(url)
        endpoint = hf_endpoint()
        _check_endpoint(endpoint, allow_insecure)
        token = token if token is not None else hf_token()
        sha = resolve_revision(repo, revision, token, allow_insecure=allow_insecure)
        files = list_tree(repo, sha, folder, token, allow_insecure=allow_insecure)
        base = hub_resolve_url(repo, sha, endpoint) + (f"/{folder}" if folder else "")
        listing = shards_from_listing(files, url, dataset_shards)
        if revision != sha:
            logger.info("%s: revision %s is commit %s; every shard is read at that commit", url, revision, sha)
        return Source(base, len(listing), token=token, token_origin=url_origin(endpoint) if token else None,
                      allow_insecure=allow_insecure, kind="hf", revision=sha, listing=listing)
    from .objectstore import list_folder
    if kind == "file":
        url = _file_url(url)
    url = url.rstrip("/")
    files = list_folder(kind, url, storage_options)
    listing = shards_from_listing(files, url, dataset_shards)
    return Source(url, len(listing), kind=kind, revision=listing_revision(listing), listing=listing,
                  storage_options=dict(storage_options or {}))


def _file_url(url):
    """A local path or file:// URL -> file:///absolute/dir (ConfigError when it is not a directory)."""
    path = urlsplit(url).path if url.startswith("file://") else url
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(f"source {url!r}: no such directory (a local source is a folder of shard_XXXXX.parquet)")
    return "file://" + path


def shards_from_listing(files, where, dataset_shards=None):
    """The listing's shards 0..T-1 as a tuple of RemoteInfo (T = dataset_shards, else as many as listed).
    ConfigError when there are none, when one is missing, when dataset_shards asks for more, for a name that
    is not a plain file name and for a shard's size that is no non-negative int."""
    where = redact_url(where)
    found = {}
    for name, info in files.items():
        why = _not_plain(name)
        if why:
            raise ConfigError(f"source {where!r} lists {name!r}, which is not a plain file name ({why}): a "
                              f"listing names the files directly in its folder, so this one is broken or "
                              f"hostile; remove or rename that file, or list another folder")
        m = SHARD_RE.fullmatch(name)
        if not m or name != shard_name(int(m.group(1))):
            continue            # a lookalike (shard_000003.parquet): not the file its shard is read from
        size = info.size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ConfigError(f"source {where!r} lists {name} with size {size!r}, not a size in bytes: the "
                              f"listing is broken; check the store")
        found[int(m.group(1))] = info
    if not found:
        raise ConfigError(f"source {where!r} holds no shard_XXXXX.parquet files (listed {len(files)} other "
                          f"file(s)): check the bucket/prefix/folder")
    listed = max(found) + 1
    if dataset_shards is not None:
        if not isinstance(dataset_shards, int) or dataset_shards < 2:
            raise ConfigError(f"dataset_shards must be an int >= 2 (train shards + 1 val shard), got {dataset_shards!r}")
        if dataset_shards > listed:
            raise ConfigError(f"dataset_shards={dataset_shards} but {where!r} lists shards up to "
                              f"{shard_name(listed - 1)} ({listed}): leave dataset_shards out to use what is listed")
    count = dataset_shards or listed
    missing = [i for i in range(count) if i not in found]
    if missing:
        named = ", ".join(shard_name(i) for i in missing[:MAX_LISTED_GAPS])
        more = f" and {len(missing) - MAX_LISTED_GAPS} more" if len(missing) > MAX_LISTED_GAPS else ""
        raise ConfigError(f"source {where!r} lacks {named}{more} of shards 0..{count - 1}: upload them, or give "
                          f"dataset_shards={missing[0]} to use the shards before the gap")
    return tuple(found[i] for i in range(count))


def _not_plain(name):
    """Why name is not a plain file name (None when it is): empty, . or .., a / or \\, a control character."""
    if not isinstance(name, str) or not name:
        return "it is empty"
    if name in (".", ".."):
        return "it is a path step"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if _CONTROL_RE.search(name):
        return "it holds a control character"
    return None


def listing_revision(listing):
    """A short digest of the listed sizes and ETags: changes when any shard is replaced, added or removed."""
    h = hashlib.sha256()
    for i, info in enumerate(listing):
        h.update(f"{i} {info.size} {info.etag} {info.sha256}\n".encode())
    return "etags-" + h.hexdigest()[:16]


def _check_endpoint(endpoint, allow_insecure):
    """The Hub's endpoint must be https (plain http only to loopback, or with allow_insecure): the token
    goes there."""
    why = url_problem(endpoint)
    if why:
        raise ConfigError(f"HF_ENDPOINT={redact_url(endpoint)!r}: {why}; set it to the Hub's URL (default "
                          f"{HF_DEFAULT_ENDPOINT}) or a mirror's, like https://HOST[:PORT]")
    p = urlsplit(endpoint)
    if p.scheme == "http" and not allow_insecure and not _is_loopback(p.hostname):
        raise ConfigError(f"HF_ENDPOINT={redact_url(endpoint)!r} uses plain http to a non-loopback host: use "
                          f"https, or opt out with allow_insecure=True (--allow-insecure)")


# -----------------------------------------------------------------------------
# shardstream ls

def cli(argv):
    p = argparse.ArgumentParser(
        prog="shardstream ls",
        description="List a source's shards with their sizes and the total (what a run would stream).",
        epilog="SOURCE: hf://datasets/ORG/NAME[@REV][/DIR], s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local dir")
    p.add_argument("source", nargs="?", default=None,
                   help="where the shards are (default: $SHARDSTREAM_SOURCE, else the dataset on the Hub)")
    p.add_argument("--dataset", default=None, help="known dataset to list from the Hub when SOURCE is left out "
                                                   "(climbmix, fineweb-edu)")
    p.add_argument("-s", "--summary", action="store_true", help="print the total only, not one line per shard")
    p.add_argument("--allow-insecure", action="store_true", help="permit plain http to a non-loopback host")
    args = p.parse_args(argv)

    url = args.source or read("SHARDSTREAM_SOURCE")
    if url is None:
        from .shards import DEFAULT_DATASET, get_dataset
        url = f"hf://datasets/{get_dataset(args.dataset or DEFAULT_DATASET).repo}"
    if source_kind(url) == "http":
        raise ConfigError(_unlistable(url))
    source = make_source(url, allow_insecure=args.allow_insecure)
    total = sum(info.size or 0 for info in source.listing)
    print(f"{source.identity()['source']}: {source.dataset_shards} shards "
          f"({source.num_train_shards} train + val {shard_name(source.val_shard)})")
    if not args.summary:
        for i, info in enumerate(source.listing):
            check = f"sha256 {info.sha256[:16]}" if info.sha256 else f"etag {info.etag}" if info.etag else ""
            print(f"{shard_name(i)}  {info.size:>15,}  {check}".rstrip())
    print(f"total {total:,} bytes ({total / 1e9:.3f} GB) in {source.dataset_shards} shards")
    return 0


def _unlistable(url):
    """What to give `shardstream ls` instead of an http(s) base URL (which has no listing API)."""
    p = urlsplit(url)
    origin = redact_url(f"{p.scheme}://{p.netloc}")
    m = _RESOLVE_RE.match(p.path)
    hf = (f"hf://datasets/{m.group(1)}/{m.group(2)}" + (f"@{m.group(3)}" if m.group(3) != "main" else "")
          + (m.group(4) or "").rstrip("/")) if m else "hf://datasets/ORG/NAME"
    hub = ("" if url_origin(url) == url_origin(HF_DEFAULT_ENDPOINT) else
           f"; for this server set HF_ENDPOINT={origin} too: `HF_ENDPOINT={origin} shardstream ls {hf}`")
    return (f"{redact_url(url)} is a plain http(s) base URL, which cannot be listed (it has no listing API). "
            f"List one of these instead: {hf} (the Hub, or a Hub-like server such as `shardstream serve`{hub}), "
            f"s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, or a local dir")


def _known_count(url):
    """The shard count of a known dataset whose Hub resolve URL url is (`<HF_ENDPOINT or the Hub>/datasets/
    ORG/NAME/resolve/REV`, no folder under it); ConfigError saying what to give for any other http(s) URL."""
    p = urlsplit(url)
    hubs = {url_origin(hf_endpoint()), url_origin(HF_DEFAULT_ENDPOINT)}
    parts = p.path.rstrip("/").split("/")
    if url_origin(url) in hubs and len(parts) == 6 and parts[:2] == ["", "datasets"] and parts[4] == "resolve":
        for d in DATASETS.values():
            if "/".join(parts[2:4]) == d.repo:
                return d.num_shards
    raise ConfigError(f"source {redact_url(url)!r} is a plain http(s) URL, which cannot be listed, so its shard "
                      f"count is unknown: give it (--dataset-shards T, SHARDSTREAM_DATASET_SHARDS=T or "
                      f"dataset_shards=T: the shards there, the val shard included), or use a source that is "
                      f"listed: hf://datasets/ORG/NAME, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local dir")


def make_source(url=None, dataset=DEFAULT_DATASET, dataset_shards=None, token=None, allow_insecure=False,
                storage_options=None):
    """Build a Source from user input: url, else the Hub URL of `dataset` (SHARDSTREAM_SOURCE is the edges').

    url: any form in the module docstring. hf://, s3://, gs:// and local dirs are listed now (listing.py):
    the Hub revision is pinned to its commit, and dataset_shards, when None, is the listed count. An
    http(s) base URL cannot be listed: dataset_shards is required, unless the URL is a known dataset's
    own Hub resolve URL (the default source is one), whose count is known; else ConfigError before any
    request (a guessed count would ask for a shard that is not there). HF_TOKEN (or token=) goes to
    the Hub's origin when the source is at it (scheme, host and port exactly); an explicit token= goes to
    the source's own origin. storage_options go to fsspec for s3/gs (e.g. {"endpoint_url": ...}; the
    usual AWS_* / GOOGLE_* variables work too).
    """
    if not url:
        url = hub_resolve_url(get_dataset(dataset).repo)
    kind = source_kind(url)
    if kind != "http":
        return open_listed_source(kind, url, dataset_shards, token=token, allow_insecure=allow_insecure,
                                  storage_options=storage_options)
    if dataset_shards is None:
        dataset_shards = _known_count(url)
    if token is None:
        # HF_TOKEN only when the source is at the Hub's exact origin (a malformed HF_ENDPOINT has none)
        token = hf_token()
        hub = url_origin(hf_endpoint())
        token_origin = hub if (token and hub and url_origin(url) == hub) else None
    else:
        token_origin = url_origin(url)
    return Source(url.rstrip("/"), int(dataset_shards), token=token, token_origin=token_origin,
                  allow_insecure=allow_insecure)
