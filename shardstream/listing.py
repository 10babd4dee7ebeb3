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

Any parquet corpus (manifest.py). make_source(url, files=GLOBS, val_files=GLOB|"none", manifest=PATH):
- hf://, s3://, gs://, local dirs: with files/val_files, or when the folder's top holds no
  shard_XXXXX.parquet, the folder is listed at every depth (hub.list_tree(recursive=True); fsspec's find
  for the others: list_tree_fsspec) and manifest.select picks the files; the Source carries the Manifest,
  pinned at the commit (hf) or at the digest of the listed sizes and ETags. A pick that is exactly
  nanochat's shards gives the Source nanochat's layout always gave (no manifest: same names, URLs,
  identity), so no resume state written before manifests existed stops matching.
- manifest=PATH: a manifest file (read_manifest_file; manifest.parse_manifest_file): one path relative
  to the source URL, or one absolute URL, per line, in the order the run reads them (the last is val
  unless val_files says otherwise). Against a listed source every relative path must be listed (its
  size/sha256/ETag are pinned from there); a plain https source takes it as it is (nothing to pin).
- The default source (no URL) is the dataset's Hub resolve URL at main, made with no request;
  pin_source() turns it into the commit main names (kind "hf"), where fetching starts.
`shardstream ls` prints the manifest a run would read: index, split, source path, cache name, size, and
the totals, at the pinned revision.
"""
import argparse
import difflib
import hashlib
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError, TransientFetchError
from .manifest import NANOCHAT, ManifestEntry, from_entries, parse_manifest_file, select
from .settings import hf_token, read
from .shards import DATASETS, DEFAULT_DATASET, SHARD_RE, get_dataset, shard_name
from .source import (HF_DEFAULT_ENDPOINT, RemoteInfo, Source, _is_loopback, hf_endpoint, hub_resolve_url,
                     redact_url, source_kind, url_origin, url_problem)

logger = logging.getLogger(__name__)

MAX_LISTED_GAPS = 5             # missing shard ids named in the error
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_RESOLVE_RE = re.compile(r"^/datasets/([^/]+)/([^/]+)/resolve/([^/]+)(/.*)?$")


def open_listed_source(kind, url, dataset_shards=None, *, token=None, allow_insecure=False, storage_options=None,
                       files=None, val_files=None, entries=None):
    """A Source of kind hf/s3/gs/file, listed and pinned now (see the module docstring). files/val_files
    (globs) or entries (a manifest file's, parse_manifest_file) ask for a manifest; without them the
    folder's top is listed for nanochat's shards, and only when it holds none is it listed at every depth."""
    chosen = files is not None or val_files is not None or entries is not None
    if chosen and dataset_shards is not None:
        raise ConfigError(f"source {redact_url(url)!r}: dataset_shards={dataset_shards} counts nanochat's "
                          f"shard_XXXXX.parquet files; with --files, --val-files or --manifest the count is the "
                          f"manifest's: leave dataset_shards out")
    if kind == "hf":
        from .hub import hub_token, list_tree, parse_hf_url, resolve_revision
        repo, revision, folder = parse_hf_url(url)
        endpoint = hf_endpoint()
        _check_endpoint(endpoint, allow_insecure)
        token = hub_token(token)        # HF_TOKEN, else the token `hf auth login` saved under HF_HOME
        sha = resolve_revision(repo, revision, token, endpoint=endpoint, allow_insecure=allow_insecure)
        if revision != sha:
            logger.info("%s: revision %s is commit %s; every shard is read at that commit", url, revision, sha)
        base = hub_resolve_url(repo, sha, endpoint) + (f"/{folder}" if folder else "")
        name = f"hf://datasets/{repo}" + (f"/{folder}" if folder else "")

        def lister(recursive):
            return list_tree(repo, sha, folder, token, recursive=recursive, endpoint=endpoint,
                             allow_insecure=allow_insecure)

        def make(n, listing, revision_, manifest=None):
            return Source(base, n, token=token, token_origin=url_origin(endpoint) if token else None,
                          allow_insecure=allow_insecure, kind="hf", revision=sha, listing=listing, manifest=manifest)
        revision_of = lambda listing: sha       # noqa: E731  (the commit pins every file)
    else:
        if kind == "file":
            url = _file_url(url)
        url = url.rstrip("/")
        base = name = url

        def lister(recursive):
            if recursive:
                return list_tree_fsspec(kind, url, storage_options)
            from .objectstore import list_folder
            return list_folder(kind, url, storage_options)

        def make(n, listing, revision_, manifest=None):
            return Source(url, n, kind=kind, revision=revision_, listing=listing,
                          storage_options=dict(storage_options or {}), manifest=manifest)
        revision_of = listing_revision
    flat = None
    if not chosen:
        flat = lister(False)
        if _holds_shards(flat) or dataset_shards is not None:
            listing = shards_from_listing(flat, url, dataset_shards)
            return make(len(listing), listing, revision_of(listing))
    tree = lister(True)
    if entries is not None:
        manifest = _manifest_from_file(entries, tree, val_files, name)
    else:
        if not chosen and not any(p.endswith(".parquet") for p in tree):
            shards_from_listing(flat, url)      # raises: nothing to read, named as it always was
        manifest = select(tree, files, val_files, source=name)
        if manifest.layout == NANOCHAT:
            # exactly nanochat's shards: the Source nanochat's layout always made (same names, URLs, identity)
            listing = tuple(tree[e.path] for e in manifest.entries)
            return make(len(listing), listing, revision_of(listing))
        logger.info("%s: %d train + %d val files selected (%s)", name, len(manifest.train), len(manifest.val),
                    ", ".join(files) if isinstance(files, (list, tuple)) else files or "every **/*.parquet")
    listing = tuple(tree.get(e.path) or RemoteInfo(e.size, e.sha256, e.etag) if e.url is None else
                    RemoteInfo(None, None, None) for e in manifest.entries)
    revision = revision_of(listing)
    manifest = replace(manifest, revision=revision)
    return make(len(manifest), listing, revision, manifest)


def _holds_shards(files):
    """Whether a flat listing holds any of nanochat's shard_XXXXX.parquet names."""
    for name in files:
        m = SHARD_RE.fullmatch(name) if isinstance(name, str) else None
        if m and name == shard_name(int(m.group(1))):
            return True
    return False


def _manifest_from_file(entries, tree, val_files, name):
    """A manifest file's entries held against the listing: each relative path must be listed (its size,
    sha256 and ETag are pinned from there); an absolute URL is read as it is, unlisted."""
    missing = [e.path for e in entries if e.url is None and e.path not in tree]
    if missing:
        near = difflib.get_close_matches(missing[0], list(tree), n=MAX_LISTED_GAPS, cutoff=0.3)
        raise ConfigError(f"the manifest file names {len(missing)} file(s) that {name} does not hold, e.g. "
                          f"{', '.join(repr(p) for p in missing[:MAX_LISTED_GAPS])}"
                          + (f" (nearest: {', '.join(near)})" if near else "")
                          + ": write paths relative to the source, as `shardstream ls` shows them")
    pinned = tuple(e if e.url is not None else
                   ManifestEntry(e.path, tree[e.path].size, tree[e.path].sha256, tree[e.path].etag)
                   for e in entries)
    return from_entries(pinned, val_files, source=name, where=f"manifest file for {name}")


def list_tree_fsspec(kind, url, storage_options=None):
    """{path relative to the folder at url: RemoteInfo} of every file under it, at any depth (see
    objectstore.list_folder). A path that is no safe path is left for manifest.entries_from_listing."""
    from .objectstore import list_folder
    return list_folder(kind, url, storage_options, recursive=True)


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

def add_manifest_arguments(p):
    """--files, --val-files, --manifest: the same flags for `shardstream ls` and `shardstream download`."""
    p.add_argument("--files", action="append", default=None, metavar="GLOB",
                   help="train files to read, a glob over the paths under SOURCE ('sample/10BT/*.parquet', "
                        "'data/**/*.parquet'; repeat for more; default: nanochat's shard_XXXXX.parquet, else "
                        "every **/*.parquet; $SHARDSTREAM_FILES)")
    p.add_argument("--val-files", default=None, metavar="GLOB",
                   help="val files: a glob, or 'none' for no val (default: the last file; $SHARDSTREAM_VAL_FILES)")
    p.add_argument("--manifest", default=None, metavar="FILE",
                   help="a text file naming the files, one path relative to SOURCE (or absolute URL) per line; "
                        "the way to give a plain https source ($SHARDSTREAM_MANIFEST)")


def manifest_choice(args, env=None):
    """(files, val_files, manifest) from the flags, else SHARDSTREAM_FILES / _VAL_FILES / _MANIFEST."""
    files = args.files if args.files is not None else read("SHARDSTREAM_FILES", env)
    val_files = args.val_files if args.val_files is not None else read("SHARDSTREAM_VAL_FILES", env)
    manifest = args.manifest if args.manifest is not None else read("SHARDSTREAM_MANIFEST", env)
    return (list(files) if files is not None else None), val_files, manifest


def cli(argv):
    p = argparse.ArgumentParser(
        prog="shardstream ls",
        description="List the files a run would stream from a source: index, source path, cache name (its file "
                    "in the data dir), size, and the total, at the pinned revision.",
        epilog="SOURCE: hf://datasets/ORG/NAME[@REV][/DIR], s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local dir "
               "(an https base URL with --manifest)")
    p.add_argument("source", nargs="?", default=None,
                   help="where the shards are (default: $SHARDSTREAM_SOURCE, else the dataset on the Hub)")
    p.add_argument("--dataset", default=None, help="known dataset to list from the Hub when SOURCE is left out "
                                                   "(climbmix, fineweb-edu)")
    add_manifest_arguments(p)
    p.add_argument("-s", "--summary", action="store_true", help="print the total only, not one line per shard")
    p.add_argument("--allow-insecure", action="store_true", help="permit plain http to a non-loopback host")
    args = p.parse_args(argv)

    files, val_files, manifest = manifest_choice(args)
    url = args.source or read("SHARDSTREAM_SOURCE")
    if url is None and manifest is None:
        from .shards import DEFAULT_DATASET, get_dataset
        url = f"hf://datasets/{get_dataset(args.dataset or DEFAULT_DATASET).repo}"
    if url is not None and source_kind(url) == "http" and manifest is None:
        raise ConfigError(_unlistable(url))
    source = make_source(url, allow_insecure=args.allow_insecure, files=files, val_files=val_files,
                         manifest=manifest)
    for line in describe(source, summary=args.summary):
        print(line)
    return 0


def describe(source, summary=False):
    """`shardstream ls`'s lines for source: a header (the pinned source, train/val counts), one line per
    shard (index, source path, cache name, size, checksum) unless summary, and the total."""
    sizes = [info.size for info in source.listing] if source.listing else [None] * source.dataset_shards
    known = sum(s or 0 for s in sizes)
    unknown = sum(s is None for s in sizes)
    val = source.val_shards
    vals = ("no val" if not val else f"val {source.path(val[0])}" if len(val) == 1 else f"{len(val)} val")
    m = source.manifest
    pinned = "" if source.revision else " (an unlisted http(s) source: not pinned to a revision)"
    layout = "" if m is None else f"; manifest {m.digest()}"
    yield (f"{source.identity()['source'].split('#', 1)[0]}: {source.dataset_shards} shards "
           f"({source.num_train_shards} train + {vals}{layout}){pinned}")
    if not summary:
        val_set = set(val)
        width = max((len(source.path(i)) for i in range(source.dataset_shards)), default=0) if m is not None else 0
        for i in range(source.dataset_shards):
            info = source.listed(i)
            check = (f"sha256 {info.sha256[:16]}" if info and info.sha256 else
                     f"etag {info.etag}" if info and info.etag else "")
            size = f"{sizes[i]:>15,}" if sizes[i] is not None else f"{'?':>15}"
            part = "val  " if i in val_set else "train"
            if m is None:
                yield f"{source.file_name(i)}  {size}  {check}".rstrip()
            else:
                yield f"{i:>6}  {part}  {source.path(i):<{width}}  {source.file_name(i)}  {size}  {check}".rstrip()
    train_bytes = sum(sizes[i] or 0 for i in range(source.num_train_shards))
    val_bytes = known - train_bytes
    more = f", {unknown} of unknown size" if unknown else ""
    yield (f"total {known:,} bytes ({known / 1e9:.3f} GB) in {source.dataset_shards} shards: "
           f"{source.num_train_shards} train ({train_bytes:,} bytes), {len(val)} val ({val_bytes:,} bytes){more}")


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
                storage_options=None, files=None, val_files=None, manifest=None):
    """Build a Source from user input: url, else the Hub URL of `dataset` (SHARDSTREAM_SOURCE is the edges').

    url: any form in the module docstring. hf://, s3://, gs:// and local dirs are listed now (listing.py):
    the Hub revision is pinned to its commit, and dataset_shards, when None, is the listed count. An
    http(s) base URL cannot be listed: dataset_shards is required, unless the URL is a known dataset's
    own Hub resolve URL (the default source is one), whose count is known; else ConfigError before any
    request (a guessed count would ask for a shard that is not there). HF_TOKEN (or token=) goes to
    the Hub's origin when the source is at it (scheme, host and port exactly); an explicit token= goes to
    the source's own origin. storage_options go to fsspec for s3/gs (e.g. {"endpoint_url": ...}; the
    usual AWS_* / GOOGLE_* variables work too).

    Any parquet corpus (manifest.py): files (a glob or a list of globs, matched against the whole path
    under the source: 'sample/10BT/*.parquet', 'data/**/*.parquet') and val_files (a glob, or "none")
    select files of a listed source at any depth; manifest is the path of a manifest file (one path
    relative to the source, or absolute URL, per line; '#' comments), the only way to give a plain
    http(s) source other files than shard_XXXXX.parquet. Relative paths of a manifest file are resolved
    against the source URL (never against the file's own folder); with no url every line must be an
    absolute http(s) URL. The result carries a Manifest (Source.manifest), unless the selection is exactly
    nanochat's shards, which keeps the Source nanochat's layout always gave.

    The default source (url None) is the dataset's Hub resolve URL at `main`, made without a request (a
    bare StreamingDownloader() stays offline): pin_source(source) turns it into the commit `main` names,
    and whoever starts fetching calls it (the download CLI does; see pin_source).
    """
    entries = read_manifest_file(manifest) if manifest is not None else None
    if entries is not None and files is not None:
        raise ConfigError("give --files GLOB or --manifest FILE, not both: a manifest file names the files itself")
    if isinstance(files, str):
        files = [files]
    if files is not None and (not files or not all(isinstance(f, str) and f.strip() for f in files)):
        raise ConfigError(f"files must be one glob or a list of non-empty globs, got {files!r}")
    if not url:
        if entries is not None:
            return _manifest_only_source(entries, val_files, token, allow_insecure, manifest)
        if files is not None or val_files is not None:
            url = f"hf://datasets/{get_dataset(dataset).repo}"     # select from the dataset's listing
        else:
            url = hub_resolve_url(get_dataset(dataset).repo)
    kind = source_kind(url)
    if kind != "http":
        return open_listed_source(kind, url, dataset_shards, token=token, allow_insecure=allow_insecure,
                                  storage_options=storage_options, files=files, val_files=val_files, entries=entries)
    if files is not None or (val_files is not None and entries is None):
        raise ConfigError(f"source {redact_url(url)!r} is a plain http(s) URL, which cannot be listed, so --files "
                          f"and --val-files have nothing to select from: name the files in a manifest file "
                          f"(--manifest FILE: one path relative to the URL per line), or use a listed source "
                          f"(hf://datasets/ORG/NAME, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or a local dir)")
    if entries is not None and dataset_shards is not None:
        raise ConfigError(f"source {redact_url(url)!r}: dataset_shards={dataset_shards} counts nanochat's "
                          f"shard_XXXXX.parquet files; with --manifest the count is the manifest's: leave it out")
    if dataset_shards is None and entries is None:
        dataset_shards = _known_count(url)
    if token is None:
        # HF_TOKEN only when the source is at the Hub's exact origin (a malformed HF_ENDPOINT has none)
        token = hf_token()
        hub = url_origin(hf_endpoint())
        token_origin = hub if (token and hub and url_origin(url) == hub) else None
    else:
        token_origin = url_origin(url)
    m = None
    if entries is not None:
        m = from_entries(entries, val_files, source=redact_url(url), where=f"manifest file {os.fspath(manifest)!r}")
    return Source(url.rstrip("/"), None if m is not None else int(dataset_shards), token=token,
                  token_origin=token_origin, allow_insecure=allow_insecure, manifest=m)


def _manifest_only_source(entries, val_files, token, allow_insecure, manifest):
    """A Source for a manifest file of absolute http(s) URLs given without a source URL: its base URL is
    the first entry's folder (for messages only: every entry has its own URL)."""
    relative = [e.path for e in entries if e.url is None]
    if relative:
        raise ConfigError(f"manifest file {os.fspath(manifest)!r} names relative paths (e.g. {relative[0]!r}) but "
                          f"no source URL is given to resolve them against: give --source URL "
                          f"(SHARDSTREAM_SOURCE), or write absolute URLs in the file")
    first = entries[0].url
    if source_kind(first) != "http":
        raise ConfigError(f"manifest file {os.fspath(manifest)!r}: without a source URL its lines must be "
                          f"http(s) URLs, got {redact_url(first)!r}: give --source (s3://BUCKET/PREFIX, ...) "
                          f"and write paths relative to it")
    base = first.split("?", 1)[0].rsplit("/", 1)[0]
    m = from_entries(entries, val_files, source=redact_url(base), where=f"manifest file {os.fspath(manifest)!r}")
    return Source(base, None, token=token, token_origin=url_origin(base) if token else None,
                  allow_insecure=allow_insecure, manifest=m)


MAX_MANIFEST_BYTES = 64 << 20       # a manifest file of a million paths is ~60 MB


def read_manifest_file(path):
    """The entries of the manifest file at path (manifest.parse_manifest_file); ConfigError naming the file
    when it cannot be read, is not UTF-8 text, or is larger than MAX_MANIFEST_BYTES."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"manifest must be the path of a manifest file, got {path!r}")
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"manifest file {os.fspath(path)!r}: cannot read it ({e.strerror or e}): give the "
                          f"path of a text file with one path or URL per line") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"manifest file {os.fspath(path)!r} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: "
                          f"is it a manifest (one path or URL per line)?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"manifest file {os.fspath(path)!r} is not UTF-8 text: write one path or URL per "
                          f"line") from None
    return parse_manifest_file(text, where=f"manifest file {os.fspath(path)!r}")


_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def pin_source(source, allow_insecure=None):
    """source at a commit: a plain Hub resolve URL at a branch or tag (`<the Hub or HF_ENDPOINT>/datasets/
    ORG/NAME/resolve/main[/DIR]`, which the default source is) becomes the same files at the commit sha the
    revision names now (kind "hf", revision the sha, so identity() carries it); any other source is returned
    as it is (a listed one is pinned already; another http(s) URL has no revision to pin). One request to
    the Hub's API (hub.resolve_revision): call it where fetching starts, not where a Source is only made.

    Offline (HF_HUB_OFFLINE), an unreachable Hub, or a mirror without the API: ConfigError /
    TransientFetchError saying so, and how to go without a request: name the commit in the URL
    (.../resolve/<40-hex sha>, or hf://datasets/ORG/NAME@<sha>), or use a local dir."""
    hub = _hub_branch(source)
    if hub is None:
        return source
    origin, repo, revision, folder = hub
    from .hub import hub_token, resolve_revision
    allow = source.allow_insecure if allow_insecure is None else allow_insecure
    _check_endpoint(origin, allow)
    token = source.token if source.token_origin == url_origin(origin) else None
    token = hub_token(token) if url_origin(origin) == url_origin(hf_endpoint()) else token
    how = (f"to go without it, name the commit in the URL ({origin}/datasets/{repo}/resolve/<40-hex sha>, or "
           f"hf://datasets/{repo}@<sha>), or read a local dir")
    try:
        sha = resolve_revision(repo, revision, token, endpoint=origin, allow_insecure=allow)
    except TransientFetchError as e:
        raise TransientFetchError(f"cannot pin {source.name} to the commit {revision!r} names: {e}; {how}",
                                  url=e.url, attempts=e.attempts, cause=e.cause) from None
    except ConfigError as e:
        raise ConfigError(f"cannot pin {source.name} to the commit {revision!r} names: {e}; {how}") from None
    if sha != revision:
        logger.info("%s: revision %s is commit %s; every shard is read at that commit", source.name, revision, sha)
    base = f"{origin}/datasets/{repo}/resolve/{sha}" + (f"/{folder}" if folder else "")
    return Source(base, source.dataset_shards, token=token, token_origin=url_origin(origin) if token else None,
                  allow_insecure=source.allow_insecure, kind="hf", revision=sha, listing=source.listing)


def pin_when_reachable(source):
    """pin_source where a run starts (StreamingDownloader.start, make_node_downloader): a Hub that does not
    answer now is no reason to fail a run the transfer loop can ride out (it announces an unreachable source
    and retries under the failure policy), so the run goes on at the branch, unpinned, with a warning.
    A Hub that answers "no" (offline mode, a missing repo or revision) still raises."""
    try:
        return pin_source(source)
    except TransientFetchError as e:
        logger.warning("%s; reading %s unpinned: a commit pushed during the run would mix two commits' shards",
                       e, source.name)
        return source


def _hub_branch(source):
    """(origin, repo, revision, folder) of an http Source whose base URL is a Hub resolve URL at a revision
    that is no commit sha, at the Hub's origin (HF_ENDPOINT's or the default Hub's); else None."""
    if source.kind != "http" or source.manifest is not None or source.revision is not None:
        return None
    origin = url_origin(source.base_url)
    if origin is None or origin not in {url_origin(hf_endpoint()), url_origin(HF_DEFAULT_ENDPOINT)}:
        return None
    m = _RESOLVE_RE.match(urlsplit(source.base_url).path)
    if not m or _COMMIT_RE.fullmatch(m.group(3)):
        return None
    p = urlsplit(source.base_url)
    return (f"{p.scheme}://{p.netloc.rpartition('@')[2]}", f"{m.group(1)}/{m.group(2)}", m.group(3),
            (m.group(4) or "").strip("/"))
