"""The HuggingFace Hub's API, as much as an hf:// source needs: the commit a revision names, and the
files of a dataset folder with their sizes and LFS sha256.

    repo, revision, folder = parse_hf_url("hf://datasets/karpathy/climbmix-400b-shuffle@main")
    sha = resolve_revision(repo, revision, token)      # GET /api/datasets/<repo>/revision/<revision>
    files = list_tree(repo, sha, folder, token)        # GET /api/datasets/<repo>/tree/<sha>[/<folder>]

Requests go to HF_ENDPOINT (default https://huggingface.co), with the token as a bearer token only to
HF_ENDPOINT's exact origin (scheme, host, port): redirects and next-page links are followed by hand, each
held to source.follow_problem, and elsewhere get no token. A dropped connection, 429, 5xx or an answer
slower than API_DEADLINE is retried a few times, then TransientFetchError; 401/403/404 and answers that
are not the Hub's JSON are ConfigErrors saying what to check.

The answers are untrusted input: an answer over MAX_API_BYTES, a tree listing whose next-page links loop
or run past MAX_TREE_PAGES pages, a malformed entry (not an object, no path, a size that is no
non-negative int, lfs not an object, an oid that is no sha256), an entry outside the listed folder, a name
listed twice: each a ConfigError naming the entry and the URL. listing.py refuses names that are not
plain file names.
"""
import http.client
import json
import logging
import re
import time
from urllib.parse import quote, unquote, urljoin

import requests
import urllib3

from .errors import ConfigError, TransientFetchError
from .source import RemoteInfo, follow_problem, hf_endpoint, redact_url, token_headers

logger = logging.getLogger(__name__)

API_ATTEMPTS = 4
API_TIMEOUT = (10, 60)          # connect, read (seconds)
API_DEADLINE = 300.0            # seconds to read one whole answer: a server trickling bytes gets no longer
MAX_API_BYTES = 64 << 20        # one answer (a tree page of 1,000 entries is ~300 KB)
MAX_REDIRECTS = 10
MAX_TREE_PAGES = 10_000         # 10 M entries at the Hub's 1,000 a page: far beyond any dataset
HF_URL_RE = re.compile(r"^hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?$")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class _SlowAnswer(Exception):
    """An answer that did not arrive within API_DEADLINE (retried like a timeout)."""


def parse_hf_url(url):
    """'hf://datasets/ORG/NAME[@REVISION][/FOLDER]' -> (repo 'ORG/NAME', revision (default main), folder)."""
    m = HF_URL_RE.match(url)
    if not m:
        raise ConfigError(f"source {url!r} is not an hf:// dataset URL: write hf://datasets/ORG/NAME, "
                          f"optionally @REVISION (branch, tag or commit) and /FOLDER")
    org, name, revision, folder = m.groups()
    return f"{org}/{name}", unquote(revision or "main"), (folder or "").strip("/")


def resolve_revision(repo, revision="main", token=None, *, allow_insecure=False):
    """The commit sha that `revision` (a branch, tag or sha) of dataset `repo` names now."""
    url = f"{hf_endpoint()}/api/datasets/{repo}/revision/{quote(revision, safe='')}"
    data, _ = _get_json(url, token, f"hf://datasets/{repo}@{revision}", allow_insecure)
    sha = data.get("sha") if isinstance(data, dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise ConfigError(f"hf://datasets/{repo}@{revision}: the Hub's answer has no commit sha "
                          f"(is HF_ENDPOINT={hf_endpoint()} the Hub?)")
    return sha


def list_tree(repo, sha, folder="", token=None, *, allow_insecure=False, max_pages=None):
    """{file name relative to folder: RemoteInfo(size, sha256 of LFS files, etag None)} of one folder at
    commit sha, page after page (`Link: rel=next`), at most max_pages (default MAX_TREE_PAGES) pages."""
    max_pages = MAX_TREE_PAGES if max_pages is None else max_pages
    url = f"{hf_endpoint()}/api/datasets/{repo}/tree/{sha}"
    if folder:
        url += "/" + quote(folder)
    what = f"hf://datasets/{repo}@{sha[:12]}" + (f"/{folder}" if folder else "")
    files, pages = {}, {}           # pages: URL -> page number, so a link back to one is a loop
    while url:
        if url in pages:
            raise ConfigError(f"{what}: the tree listing's next-page link on page {len(pages)} loops back to "
                              f"page {pages[url]} ({redact_url(url)}): the server is broken (is HF_ENDPOINT="
                              f"{redact_url(hf_endpoint())} the Hub?)")
        if len(pages) >= max_pages:
            raise ConfigError(f"{what}: the tree listing runs to more than {max_pages} pages (next "
                              f"{redact_url(url)}): its next-page links do not end (is HF_ENDPOINT="
                              f"{redact_url(hf_endpoint())} the Hub?)")
        pages[url] = len(pages) + 1
        page, next_url = _get_json(url, token, what, allow_insecure)
        if not isinstance(page, list):
            raise ConfigError(f"{what}: the tree answer from {redact_url(url)} is not a list but "
                              f"{_show(page)} (is HF_ENDPOINT the Hub?)")
        for n, entry in enumerate(page):
            where = f"{what}: tree entry {n} of {redact_url(url)}"
            listed = _tree_file(entry, folder, where)
            if listed is None:
                continue
            name, info = listed
            if name in files:
                raise ConfigError(f"{where} lists {name!r} twice (with size {files[name].size}, then "
                                  f"{info.size}): the listing is inconsistent, so no size or sha256 of it "
                                  f"can be trusted; try again later")
            files[name] = info
        url = next_url
    return files


def _tree_file(entry, folder, where):
    """(name relative to folder, RemoteInfo) of one tree entry, None for a directory; ConfigError naming
    the entry for anything malformed. A name that is no plain file name is left for listing.py to refuse."""
    def bad(why):
        return ConfigError(f"{where} {why}: {_show(entry)} (is HF_ENDPOINT the Hub?)")
    if not isinstance(entry, dict):
        raise bad("is not a JSON object")
    kind, path = entry.get("type"), entry.get("path")
    if not isinstance(kind, str):
        raise bad("has no type (file or directory)")
    if not isinstance(path, str) or not path:
        raise bad("has no path")
    prefix = f"{folder}/" if folder else ""
    if not path.startswith(prefix):
        raise bad(f"is not in the folder {folder!r} that was listed")
    if kind != "file":
        return None
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("has no size in bytes (a non-negative integer)")
    lfs = entry.get("lfs")
    if lfs is None:
        lfs = {}
    if not isinstance(lfs, dict):
        raise bad("has an lfs field that is not a JSON object")
    sha = lfs.get("oid")
    if sha is not None and not (isinstance(sha, str) and SHA256_RE.fullmatch(sha)):
        raise bad("has an lfs oid that is not a sha256 (64 hex digits)")
    return path[len(prefix):], RemoteInfo(size=size, sha256=sha.lower() if sha else None, etag=None)


def _show(obj, limit=120):
    """A bounded, printable rendering of untrusted JSON for an error message."""
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError):
        text = repr(obj)
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _get_json(url, token, what, allow_insecure=False):
    """(JSON body, URL of the next page or None), retrying network failures, slow answers, 429 and 5xx."""
    cause = None
    for attempt in range(1, API_ATTEMPTS + 1):
        if attempt > 1:
            time.sleep(min(8.0, 0.5 * 2 ** (attempt - 2)))
        try:
            code, body, next_url, at = _get(url, token, what, allow_insecure)
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
                _SlowAnswer) as e:      # raw reads raise urllib3's and the socket's own errors
            cause = f"{type(e).__name__}: {e}".replace(token or "\0", "<redacted>")
            logger.info("%s: the Hub's API did not answer (%s); retrying", what, cause)
            continue
        if code == 200:
            try:
                return json.loads(body), next_url
            except (ValueError, RecursionError):
                raise ConfigError(f"{what}: {redact_url(at)} did not answer JSON (is HF_ENDPOINT the Hub?)") \
                    from None
        detail = _CONTROL_RE.sub(" ", body[:200].decode("utf-8", "replace")).strip()
        detail = detail.replace(token or "\0", "<redacted>")
        if code in (401, 403):
            raise ConfigError(f"{what}: HTTP {code}, not authorized: for a private or gated dataset set "
                              f"HF_TOKEN to a token that has access ({detail})")
        if code == 404:
            raise ConfigError(f"{what}: HTTP 404 ({detail}): check the repo name, the revision and the "
                              f"folder (a private repo also answers 404 without a token)")
        if code != 429 and code < 500:
            raise ConfigError(f"{what}: HTTP {code} from {redact_url(at)} ({detail})")
        cause = f"HTTP {code}"
    raise TransientFetchError(f"{what}: the Hub's API failed {API_ATTEMPTS} times ({cause}); try again later",
                              url=redact_url(url), attempts=API_ATTEMPTS, cause=cause)


def _get(url, token, what, allow_insecure):
    """GET url, following redirects by hand: each hop must pass source.follow_problem and gets the token
    only at HF_ENDPOINT's exact origin. Returns (status, body, next-page URL or None, the URL answering)."""
    for _ in range(MAX_REDIRECTS + 1):
        headers = token_headers(token, hf_endpoint(), url)
        try:
            resp = requests.get(url, headers=headers, timeout=API_TIMEOUT, allow_redirects=False, stream=True)
        except ValueError as e:
            if isinstance(e, requests.RequestException):
                raise
            # requests parses a Location even when it does not follow it: a malformed one is a ValueError
            raise ConfigError(f"{what}: refused a redirect from {redact_url(url)} to a malformed URL ({e})") \
                from None
        with resp:
            if resp.is_redirect:
                url = _follow(url, resp.headers["Location"], what, "a redirect", allow_insecure)
                continue
            body = _read(resp, url, what)
            link = resp.links.get("next", {}).get("url") if resp.status_code == 200 else None
            next_url = _follow(url, link, what, "a next-page link", allow_insecure) if link else None
            return resp.status_code, body, next_url, url
    raise ConfigError(f"{what}: more than {MAX_REDIRECTS} redirects from the Hub's API (last {redact_url(url)})")


def _follow(base, link, what, kind, allow_insecure):
    """The absolute URL a redirect or next-page link names; ConfigError when it may not be followed."""
    try:
        target = urljoin(base, link)
    except ValueError:
        target = link
    why = follow_problem(target, allow_insecure)
    if why:
        raise ConfigError(f"{what}: refused {kind} from {redact_url(base)} to {why}")
    return target


def _read(resp, url, what):
    """The body, at most MAX_API_BYTES (decoded) and within API_DEADLINE seconds: a hostile server may send
    without end, or a byte at a time."""
    deadline = time.monotonic() + API_DEADLINE
    read = getattr(resp.raw, "read1", None)       # returns what has arrived (urllib3 2); read() waits for all
    chunks, total = [], 0
    while True:
        chunk = read(65536, decode_content=True) if read else resp.raw.read(65536, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_API_BYTES:
            raise ConfigError(f"{what}: the answer from {redact_url(url)} is larger than {MAX_API_BYTES >> 20} "
                              f"MiB (is HF_ENDPOINT the Hub?)")
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise _SlowAnswer(f"the answer from {redact_url(url)} took longer than {API_DEADLINE:g} s")
