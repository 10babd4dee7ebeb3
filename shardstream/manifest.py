"""The manifest: the ordered list of files a run reads, pinned, with its train/val split.

    entries = entries_from_listing({"sample/10BT/000_00000.parquet": info, ...})   # a listing's records
    m = select(entries, files=["sample/10BT/*.parquet"], val_files=None, revision=sha, source=name)
    m.entries[i]          # shard i: ManifestEntry(path, size, sha256, etag, url)
    m.cache_name(i)       # its file name in the data dir ("000003-1f0c2a9b7d3e.parquet", or shard_00003.parquet)
    m.digest()            # goes into the loader state's fingerprint: any changed entry changes it

Shard ids are indices into `entries` = train + val, so the val files come last, as nanochat's val shard
does. Order: sorted paths (a listing's order is the server's, not a promise).

Which files (`select`):
- files=None over a listing holding shard_XXXXX.parquet at its top: nanochat's layout. Shards 0..T-1,
  no gap (a gap is a ConfigError, as listing.shards_from_listing says), other files ignored; the last
  one is val; cache names keep shard_XXXXX.parquet.
- files=None otherwise: every `**/*.parquet`.
- files=[globs]: the union of their matches (each glob must match something: a ConfigError names the
  nearest paths and folders otherwise). A glob is matched against the whole path: `**` any depth
  (zero folders too), `*` and `?` within one path step, `[...]` a class. A selection that is exactly
  nanochat's shards still counts as nanochat's layout.
- val_files=None: the last selected file is val (nanochat's rule); a GLOB: those files are val (and
  taken out of the train files, also of an explicit `files` that matches them too);
  "none": no val files.

Paths come from listings and manifest files, both untrusted: '..', '.', empty steps, absolute paths,
backslashes and control characters are refused (`path_problem`) wherever they come from, and cache names
never hold a path (`cache_name`: the index and a digest of the path), so no listing can write outside
the data dir or make two files (a/0.parquet, b/0.parquet) share a name.

Pure: no I/O. `parse_manifest_file` takes the file's text.
"""
import difflib
import functools
import hashlib
import re
from dataclasses import dataclass

from .errors import ConfigError
from .shards import SHARD_RE, shard_name

NANOCHAT = "nanochat"           # shard_XXXXX.parquet at the top, the last one val, names kept
FILES = "files"                 # any files; cache names from index + path digest
DEFAULT_FILES = ("**/*.parquet",)
MAX_SHOWN = 5                   # paths or folders named in an error
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CACHE_NAME_RE = re.compile(r"[0-9]{6,}-[0-9a-f]{12}\.parquet")


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a run: where it is (path relative to the source; url when a manifest file named an
    absolute URL) and what it must be (size, sha256, etag: whatever the listing gave; None = unknown)."""
    path: str
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The files a run reads: train then val (shard id = index into entries), pinned at revision (the
    Hub's commit sha, or a digest of a listing's ETags), from source (its name, for messages)."""
    train: tuple
    val: tuple
    revision: str | None = None
    source: str = ""
    layout: str = FILES

    @property
    def entries(self):
        return self.train + self.val

    @property
    def val_ids(self):
        return tuple(range(len(self.train), len(self.train) + len(self.val)))

    def __len__(self):
        return len(self.train) + len(self.val)

    def cache_name(self, index):
        """The data dir's name for shard `index` (see the module docstring)."""
        entries = self.entries
        if not 0 <= index < len(entries):
            raise ConfigError(f"shard {index} is outside the manifest of {self.source or 'the source'} "
                              f"(0..{len(entries) - 1})")
        return shard_name(index) if self.layout == NANOCHAT else cache_name(index, entries[index].path)

    def digest(self):
        """A digest of everything that decides what a run reads: each entry's path, size, sha256 and ETag
        in order, which are val, the layout and the revision."""
        return manifest_digest(self)


def cache_name(index, path):
    """'<index, 6+ digits>-<12 hex of sha256(path)>.parquet': only [0-9a-f-] and .parquet, whatever the
    path holds; two paths never share a name (the index differs), and a name never leaves the data dir."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ConfigError(f"a manifest index must be an int >= 0, got {index!r}")
    return f"{index:06d}-{hashlib.sha256(path.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}.parquet"


def is_cache_name(name):
    """True for a name cache_name makes (for the data dir's inventory)."""
    return bool(_CACHE_NAME_RE.fullmatch(name))


def manifest_digest(manifest):
    h = hashlib.sha256()
    h.update(f"shardstream-manifest 1\n{manifest.layout}\n{manifest.revision or ''}\n".encode())
    for part, entries in (("train", manifest.train), ("val", manifest.val)):
        h.update(f"{part} {len(entries)}\n".encode())
        for e in entries:
            h.update(f"{e.path}\t{e.url or ''}\t{e.size}\t{e.sha256 or ''}\t{e.etag or ''}\n"
                     .encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


# -----------------------------------------------------------------------------
# Paths and globs

def path_problem(path):
    """Why `path` cannot name a file inside a source, in words, or None: it must be relative, '/'-separated,
    without '.', '..' or empty steps, backslashes or control characters."""
    if not isinstance(path, str) or not path:
        return "it is empty"
    if _CONTROL_RE.search(path):
        return "it holds a control character"
    if "\\" in path:
        return "it holds a backslash (write paths with /)"
    if path.startswith("/"):
        return "it is an absolute path (write it relative to the source)"
    steps = path.split("/")
    if any(s in (".", "..") for s in steps):
        return "it holds a '.' or '..' step"
    if any(not s for s in steps):
        return "it holds an empty step ('//' or a trailing '/')"
    return None


@functools.lru_cache(maxsize=256)
def glob_regex(pattern):
    """The compiled regex of a glob (see glob_match); ConfigError for a malformed one."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"a file glob must be a non-empty string, got {pattern!r}")
    if pattern.startswith("/") or "\\" in pattern or _CONTROL_RE.search(pattern):
        raise ConfigError(f"file glob {pattern!r}: write it relative to the source, with / between folders "
                          f"(like 'sample/10BT/*.parquet' or 'data/**/*.parquet')")
    out, steps = [], pattern.split("/")
    for n, step in enumerate(steps):
        last = n == len(steps) - 1
        if step == "**":
            # any number of whole steps, zero included: 'a/**/b' matches a/b, a/x/b, a/x/y/b
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in step:
            raise ConfigError(f"file glob {pattern!r}: '**' must be a whole path step (like 'data/**/x.parquet'); "
                              f"use '*' inside a name")
        out.append(_step_regex(step, pattern) + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _step_regex(step, pattern):
    out, i = [], 0
    while i < len(step):
        c = step[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < len(step) and step[j] in "!^":
                j += 1
            if j < len(step) and step[j] == "]":
                j += 1              # a ']' first in the class is a member
            while j < len(step) and step[j] != "]":
                j += 1
            if j >= len(step):
                raise ConfigError(f"file glob {pattern!r}: '[' without its ']' (write '[[]' for a literal '[')")
            body = step[i + 1:j]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[").replace("]", "\\]")
            # a class never matches '/' (it stays within one step), negated or not
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_match(pattern, path):
    """Whether `path` matches glob `pattern` whole: `**` (a whole step) any depth including none, `*` any
    run of characters but '/', `?` one character but '/', `[abc]`/`[a-z]`/`[!abc]` one of (not) those."""
    return glob_regex(pattern).fullmatch(path) is not None


# -----------------------------------------------------------------------------
# Selecting the manifest from a listing

def entries_from_listing(files, where="the source"):
    """ManifestEntry per listed file, sorted by path, from {path: record with size/sha256/etag attributes
    (RemoteInfo)} or an iterable of ManifestEntry. ConfigError for a path path_problem refuses, a size that
    is no non-negative int, or a path listed twice."""
    if isinstance(files, dict):
        items = [ManifestEntry(p, getattr(r, "size", None), getattr(r, "sha256", None), getattr(r, "etag", None))
                 for p, r in files.items()]
    else:
        items = list(files)
    seen = {}
    for e in items:
        why = path_problem(e.path)
        if why:
            raise ConfigError(f"{where} lists {e.path!r}, which cannot be a file's path ({why}): the listing is "
                              f"broken or hostile; remove or rename that file, or list another folder")
        if e.size is not None and (not isinstance(e.size, int) or isinstance(e.size, bool) or e.size < 0):
            raise ConfigError(f"{where} lists {e.path} with size {e.size!r}, not a size in bytes: the listing "
                              f"is broken; check the store")
        if e.path in seen:
            raise ConfigError(f"{where} lists {e.path!r} twice: the listing is inconsistent; try again later")
        seen[e.path] = e
    return tuple(seen[p] for p in sorted(seen))


def nanochat_shards(entries, where="the source"):
    """The entries of nanochat's layout (shard_00000.parquet .. shard_{T-1}.parquet at the top, in order),
    or None when the top holds no shard_XXXXX.parquet; ConfigError for a gap. Lookalikes
    (shard_000003.parquet) are not shards."""
    found = {}
    for e in entries:
        m = SHARD_RE.fullmatch(e.path)
        if m and e.path == shard_name(int(m.group(1))):
            found[int(m.group(1))] = e
    if not found:
        return None
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        named = ", ".join(shard_name(i) for i in missing[:MAX_SHOWN])
        more = f" and {len(missing) - MAX_SHOWN} more" if len(missing) > MAX_SHOWN else ""
        raise ConfigError(f"{where} lacks {named}{more} of shards 0..{max(found)}: upload them, or pick "
                          f"files with --files GLOB")
    return tuple(found[i] for i in range(len(found)))


def select(listing, files=None, val_files=None, *, revision=None, source=""):
    """The Manifest a run reads from `listing` (see the module docstring for files / val_files).

    listing: {path: RemoteInfo} or ManifestEntry records. ConfigError when a glob matches nothing (naming
    the nearest paths and folders), when there is nothing to train on."""
    where = f"source {source!r}" if source else "the source"
    entries = entries_from_listing(listing, where)
    if isinstance(files, str):
        files = [files]
    if val_files is not None and not isinstance(val_files, str):
        raise ConfigError(f"val_files must be a glob, 'none' or None (the last file), got {val_files!r}")
    no_val = isinstance(val_files, str) and val_files.strip().lower() == "none"
    layout = FILES
    if files is None and val_files is None:
        shards = nanochat_shards(entries, where)
        if shards is not None:
            return _split(shards, revision, source, NANOCHAT, where)
    chosen = _matching(entries, files or DEFAULT_FILES, where, required=files is not None)
    val = ()
    if val_files is not None and not no_val:
        val = _matching(entries, [val_files], f"{where} (--val-files)", required=True)
        # a file both globs match is val: `--files '**/*.parquet' --val-files 'val/*'` means "the rest train"
        val_paths = {e.path for e in val}
        chosen = tuple(e for e in chosen if e.path not in val_paths)
    if not chosen:
        raise ConfigError(f"{where}: no files to read (listed {len(entries)}, none a train file{_sample(entries)}): "
                          f"pick them with --files GLOB")
    if files is not None and val_files is None and nanochat_shards(chosen, where) == chosen:
        layout = NANOCHAT                   # the pick is exactly nanochat's shards: keep its names
    if no_val or val_files is not None:
        return _manifest(chosen, val, revision, source, layout, where)
    return _split(chosen, revision, source, layout, where)


def from_entries(entries, val_files=None, *, revision=None, source="", where="manifest file"):
    """The Manifest of a manifest file's entries, in the file's order (its author chose it): val_files
    None: the last entry is val; a GLOB: the entries whose path matches are val (at least one must), the
    rest train, each part in file order; "none": every entry is train."""
    entries = tuple(entries)
    if val_files is not None and not isinstance(val_files, str):
        raise ConfigError(f"val_files must be a glob, 'none' or None (the last file), got {val_files!r}")
    if val_files is None:
        return _split(entries, revision, source, FILES, where)
    if val_files.strip().lower() == "none":
        return _manifest(entries, (), revision, source, FILES, where)
    regex = glob_regex(val_files)
    val = tuple(e for e in entries if regex.fullmatch(e.path))
    if not val:
        raise ConfigError(f"{where}: --val-files {val_files!r} matches none of its {len(entries)} files"
                          f"{_nearest(val_files, entries)}")
    return _manifest(tuple(e for e in entries if not regex.fullmatch(e.path)), val, revision, source, FILES, where)


def _split(chosen, revision, source, layout, where):
    """nanochat's rule: the last file is val."""
    if len(chosen) < 2:
        raise ConfigError(f"{where}: only {len(chosen)} file(s) selected ({', '.join(e.path for e in chosen)}), "
                          f"and the last one is val: select at least 2, give --val-files GLOB, or "
                          f"--val-files none to train on all")
    return _manifest(chosen[:-1], chosen[-1:], revision, source, layout, where)


def _manifest(train, val, revision, source, layout, where):
    if not train:
        raise ConfigError(f"{where}: no train files are left after the val files ({len(val)}): widen --files")
    return Manifest(tuple(train), tuple(val), revision, source, layout)


def _matching(entries, patterns, where, required):
    """The entries matching any of patterns, sorted; with required, ConfigError for a pattern that matches
    nothing, naming what is near it."""
    out = {}
    for pattern in patterns:
        regex = glob_regex(pattern)
        hits = [e for e in entries if regex.fullmatch(e.path)]
        if not hits and required:
            raise ConfigError(f"{where}: --files {pattern!r} matches none of its {len(entries)} files"
                              f"{_nearest(pattern, entries)}")
        out.update((e.path, e) for e in hits)
    return tuple(out[p] for p in sorted(out))


def _folders(entries):
    return sorted({e.path.rsplit("/", 1)[0] + "/" for e in entries if "/" in e.path})


def _nearest(pattern, entries):
    """'; nearest: ...' naming the folders and paths closest to pattern (for a pattern matching nothing)."""
    paths = [e.path for e in entries]
    folders = _folders(entries)
    near = difflib.get_close_matches(pattern, folders + paths, n=MAX_SHOWN, cutoff=0.3)
    if not near:
        near = (folders or paths)[:MAX_SHOWN]
    if not near:
        return ""
    hint = "; folders there: " + ", ".join(folders[:MAX_SHOWN]) if folders else ""
    return f" (nearest: {', '.join(near)}{hint}): check the glob (`**` for any depth, e.g. 'data/**/*.parquet')"


def _sample(entries):
    return f": {', '.join(e.path for e in entries[:MAX_SHOWN])}" if entries else ""


# -----------------------------------------------------------------------------
# Manifest files

def parse_manifest_file(text, base=None, where="manifest file"):
    """The entries a manifest file names, in its order: one path (relative to the source, or to `base`, a
    base URL, when given) or absolute URL per line; blank lines and '#' comments skipped. ConfigError
    naming the line number for a path path_problem refuses, a URL whose path has '.' or '..' steps or
    control characters, and a file named twice."""
    entries, seen = [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip(" \t\ufeff")          # a control character inside is left for the checks below
        if not line or line.startswith("#"):
            continue
        if _URL_RE.match(line):
            why = _url_problem(line)
            if why:
                raise ConfigError(f"{where}, line {n}: {_show(line)} is not a file's URL ({why})")
            path, url = line.split("?", 1)[0].split("#", 1)[0], line
        else:
            why = path_problem(line)
            if why:
                raise ConfigError(f"{where}, line {n}: {_show(line)} is not a file's path ({why}); write one "
                                  f"path relative to the source, or one URL, per line")
            path, url = line, (f"{base.rstrip('/')}/{line}" if base else None)
        if path in seen:
            raise ConfigError(f"{where}, line {n}: {_show(line)} is named again (first on line {seen[path]})")
        seen[path] = n
        entries.append(ManifestEntry(path, url=url))
    if not entries:
        raise ConfigError(f"{where} names no files: write one path or URL per line ('#' starts a comment)")
    return tuple(entries)


def _url_problem(url):
    if _CONTROL_RE.search(url) or " " in url:
        return "it holds a control character or a space (percent-encode them)"
    if "\\" in url:
        return "it holds a backslash"
    rest = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    host, _, path = rest.partition("/")
    if not host:
        return "it names no host or bucket"
    steps = path.split("/")
    if any(s in (".", "..") for s in steps) or any(s.lower() in ("%2e", "%2e%2e", ".%2e", "%2e.") for s in steps):
        return "its path holds a '.' or '..' step"
    if not path or path.endswith("/"):
        return "it names a folder, not a file"
    return None


def _show(text, limit=120):
    text = _CONTROL_RE.sub("?", text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
