"""The HuggingFace Hub's API through huggingface_hub, as much as an hf:// source needs: the commit a
revision names, and the files of a dataset (folder) with their sizes and LFS sha256.

    repo, revision, folder = parse_hf_url("hf://datasets/HuggingFaceFW/fineweb@main/sample/10BT")
    token = hub_token()                                    # HF_TOKEN, else the token `hf auth login` saved
    sha = resolve_revision(repo, revision, token)          # HfApi.dataset_info(revision=...).sha
    files = list_tree(repo, sha, folder, token)            # HfApi.list_repo_tree(recursive=True)
    # {"10BT/000_00000.parquet": RemoteInfo(size, sha256, etag=None), ...}: paths relative to folder

Only the API goes through huggingface_hub; the bytes of shards stay on shardstream's own transfer loop
(fetch.py). Requests go to HF_ENDPOINT (read when called, passed to HfApi: huggingface_hub reads its
environment once at import). HF_HUB_OFFLINE set is a ConfigError at once, before any request.

Auth (`hub_token`): an explicit token, else HF_TOKEN, else the token file under HF_HOME (or
HF_TOKEN_PATH) as `hf auth login` writes it, else whatever huggingface_hub.get_token() finds. It goes as a
bearer token only to HF_ENDPOINT's exact origin (scheme, host, port) and is never logged.

The answers are untrusted input, and huggingface_hub's own client follows redirects and next-page links
anywhere, waits without end and reads answers of any size. So while one of these calls runs, the HTTP
client huggingface_hub uses (installed once with huggingface_hub.set_client_factory; outside our calls it
is a plain httpx2 client that honours HF_HUB_OFFLINE as huggingface_hub's does) holds each request to the
rules hub.py always had, and sends nothing but the API calls made (huggingface_hub's side requests, like
the agent-harness registry its user agent fetches, are answered 404 without being sent):
- a redirect is followed here, by hand: http(s) only, well-formed, plain http only to loopback unless
  allow_insecure (source.follow_problem), at most MAX_REDIRECTS; a next-page link is held to the same;
  elsewhere than HF_ENDPOINT's origin a request carries no token;
- an answer over MAX_API_BYTES, or slower than API_DEADLINE, is cut (the first a ConfigError, the second
  retried like a dropped connection);
- a tree listing whose next-page links loop or run past MAX_TREE_PAGES pages, a page that is not a JSON
  list, a malformed entry (not an object, no type or path, a size that is no non-negative int, lfs not an
  object, an oid that is no sha256), an entry outside the listed folder, a path listed twice: each a
  ConfigError naming the entry and the URL. listing.py / manifest.py refuse paths that are no safe paths.
A dropped connection or a slow answer is retried API_ATTEMPTS times in all. 429 and 5xx: huggingface_hub's
http_backoff retries the tree's pages itself (5 times), waiting what `Retry-After` or the `RateLimit`
header (`"api";r=0;t=SECONDS`) says; the revision call has no backoff in huggingface_hub, so it is retried
here, waiting the same. Either way a wait is capped at RETRY_AFTER_MAX seconds (the header is rewritten
before huggingface_hub reads it, and an HTTP-date is turned into seconds). When the tries are spent:
TransientFetchError. huggingface_hub's errors become ours: RepositoryNotFoundError, GatedRepoError,
RevisionNotFoundError, RemoteEntryNotFoundError, 401/403 are ConfigErrors saying what to check.
"""
import contextvars
import email.utils
import json
import logging
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx2
import huggingface_hub
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from .errors import ConfigError, TransientFetchError
from .settings import foreign
from .source import RemoteInfo, follow_target, hf_endpoint, redact_url, url_origin

logger = logging.getLogger(__name__)

API_ATTEMPTS = 4                # tries of one call against dropped connections and slow answers (and 429/5xx
                                # of the revision call); the tree's pages also get huggingface_hub's backoff
API_TIMEOUT = (10, 60)          # connect, read (seconds)
API_DEADLINE = 300.0            # seconds to read one whole answer: a server trickling bytes gets no longer
MAX_API_BYTES = 64 << 20        # one answer (a tree page of 1,000 entries is ~300 KB)
MAX_REDIRECTS = 10
MAX_TREE_PAGES = 10_000         # 10 M entries at the Hub's 1,000 a page: far beyond any dataset
RETRY_AFTER_MAX = 300.0         # longest Retry-After / RateLimit wait honoured (the Hub's windows are 5 min)
HF_URL_RE = re.compile(r"^hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?$")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_RATELIMIT_T_RE = re.compile(r"(;\s*t\s*=\s*)(\d+)")
_TRUE = ("1", "on", "yes", "true")


class _SlowAnswer(Exception):
    """An answer that did not arrive within API_DEADLINE (retried like a timeout)."""


class _Unreachable(Exception):
    """The connection failed or dropped (raised instead of httpx2's errors, so huggingface_hub's backoff of
    up to 23 s does not run under ours)."""


# -----------------------------------------------------------------------------
# Settings read when called (huggingface_hub.constants holds them as they were at import)

def hub_offline():
    """Whether HF_HUB_OFFLINE asks for no Hub requests (1/on/yes/true)."""
    return (foreign("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE


def hub_token(explicit=None):
    """The token for the Hub: explicit, else HF_TOKEN, else the file `hf auth login` saved (HF_TOKEN_PATH, or
    token under HF_HOME, default $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface: read now, where
    huggingface_hub fixed the path at import), else huggingface_hub.get_token(); None without one."""
    if explicit:
        return explicit
    env = (foreign("HF_TOKEN") or "").strip()
    if env:
        return env
    home = foreign("HF_HOME") or os.path.join(foreign("XDG_CACHE_HOME") or
                                              os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    path = foreign("HF_TOKEN_PATH") or os.path.join(os.path.expanduser(home), "token")
    try:
        with open(path, encoding="utf-8") as f:
            saved = f.read(4096).strip()
    except (OSError, UnicodeDecodeError):
        saved = ""
    if saved and not _CONTROL_RE.search(saved):
        return saved
    return huggingface_hub.get_token() or None


def check_online(what):
    """ConfigError naming `what` when HF_HUB_OFFLINE is set: a listing needs the Hub's API."""
    if hub_offline():
        raise ConfigError(f"{what}: HF_HUB_OFFLINE is set, so the Hub cannot be asked which files the dataset "
                          f"holds at which commit: unset HF_HUB_OFFLINE (or set it to 0), or give a local "
                          f"directory of the files as the source")


def parse_hf_url(url):
    """'hf://datasets/ORG/NAME[@REVISION][/FOLDER]' -> (repo 'ORG/NAME', revision (default main), folder)."""
    m = HF_URL_RE.match(url)
    if not m:
        raise ConfigError(f"source {url!r} is not an hf:// dataset URL: write hf://datasets/ORG/NAME, "
                          f"optionally @REVISION (branch, tag or commit) and /FOLDER")
    org, name, revision, folder = m.groups()
    return f"{org}/{name}", unquote(revision or "main"), (folder or "").strip("/")


# -----------------------------------------------------------------------------
# The two calls

def resolve_revision(repo, revision="main", token=None, *, endpoint=None, allow_insecure=False):
    """The commit sha that `revision` (a branch, tag or sha) of dataset `repo` names now."""
    endpoint = (endpoint or hf_endpoint()).rstrip("/")
    what = f"hf://datasets/{repo}@{revision}"
    check_online(what)
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token or False)

    def call():
        return api.dataset_info(repo, revision=revision, token=token or False, timeout=API_TIMEOUT[1]).sha
    guard = _Guard(what, endpoint, token, allow_insecure)
    sha = _call(call, guard, retry_http=True)
    if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
        raise ConfigError(f"{what}: the Hub's answer has no commit sha (is HF_ENDPOINT={redact_url(endpoint)} "
                          f"the Hub?)")
    return sha


def list_tree(repo, sha, folder="", token=None, *, recursive=True, endpoint=None, allow_insecure=False,
              max_pages=None):
    """{path relative to folder: RemoteInfo(size, sha256 of LFS files, etag None)} of the files under folder
    at commit sha (recursive: at any depth, else its direct children), page after page, at most max_pages
    (default MAX_TREE_PAGES) pages. Folders are not listed."""
    endpoint = (endpoint or hf_endpoint()).rstrip("/")
    what = f"hf://datasets/{repo}@{sha[:12]}" + (f"/{folder}" if folder else "")
    check_online(what)
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token or False)
    prefix = f"{folder}/" if folder else ""

    def call():
        guard.reset_listing()
        files = {}
        for item in api.list_repo_tree(repo, folder or None, recursive=recursive, expand=False, revision=sha,
                                       repo_type="dataset", token=token or False):
            if isinstance(item, huggingface_hub.RepoFile):
                files[item.path[len(prefix):]] = RemoteInfo(size=item.size, etag=None,
                                                            sha256=item.lfs.sha256.lower() if item.lfs else None)
        return files
    guard = _Guard(what, endpoint, token, allow_insecure,
                   tree_path=urlsplit(f"{endpoint}/api/datasets/{repo}/tree/").path, folder=folder,
                   max_pages=MAX_TREE_PAGES if max_pages is None else max_pages)
    return _call(call, guard, retry_http=False)


def _call(fn, guard, retry_http):
    """fn() under guard, retried API_ATTEMPTS times for dropped connections and slow answers (and, with
    retry_http, 429/5xx after the wait the server asks for), huggingface_hub's errors mapped to ours."""
    _install_client()
    cause = None
    for attempt in range(1, API_ATTEMPTS + 1):
        wait = None
        token = _GUARD.set(guard)
        try:
            return fn()
        except (_Unreachable, _SlowAnswer) as e:
            cause = _clean(f"{type(e).__name__.strip('_')}: {e}", guard.token)
            logger.info("%s: the Hub's API did not answer (%s); retrying", guard.what, cause)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status != 429 and (status is None or status < 500):
                raise _mapped(e, status, guard) from None
            cause = f"HTTP {status}"
            if not retry_http:
                break
            wait = _retry_wait(e.response.headers)
            logger.info("%s: the Hub's API answered %s; retrying in %.1f s", guard.what, cause,
                        wait if wait is not None else 0)
        except OfflineModeIsEnabled:
            raise ConfigError(f"{guard.what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it "
                              f"was imported): unset HF_HUB_OFFLINE and start again") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{guard.what}: the Hub's answer from {redact_url(guard.last_url or guard.endpoint)} "
                              f"has an entry huggingface_hub cannot read ({type(e).__name__}: {e}) (is "
                              f"HF_ENDPOINT={redact_url(guard.endpoint)} the Hub?)") from None
        finally:
            _GUARD.reset(token)
        if attempt < API_ATTEMPTS:
            time.sleep(wait if wait is not None else min(8.0, 0.5 * 2 ** (attempt - 1)))
    raise TransientFetchError(f"{guard.what}: the Hub's API kept failing ({cause}, {attempt} tries here"
                              f"{'' if retry_http or not cause.startswith('HTTP') else ', each with huggingface_hub backoff'}"
                              f"); try again later",
                              url=redact_url(guard.last_url or guard.endpoint), attempts=API_ATTEMPTS, cause=cause)


def _mapped(e, status, guard):
    """The ConfigError for huggingface_hub's error e (status: its HTTP status)."""
    what, endpoint = guard.what, redact_url(guard.endpoint)
    detail = _clean((e.response.headers.get("X-Error-Message") if e.response is not None else None)
                    or (e.response.text[:200] if e.response is not None else str(e)), guard.token)
    auth = ("the token given was refused" if guard.token else
            "no token was found: set HF_TOKEN, or run `hf auth login` (it saves one under HF_HOME)")
    if isinstance(e, GatedRepoError):
        return ConfigError(f"{what}: HTTP {status}, the dataset is gated ({detail}): accept its conditions at "
                           f"{endpoint}/datasets/{what.split('/', 3)[3].split('@')[0]} with your account, and set "
                           f"HF_TOKEN to a token of that account ({auth})")
    if isinstance(e, RevisionNotFoundError):
        return ConfigError(f"{what}: HTTP {status}, no such revision ({detail}): check the repo name, the "
                           f"revision (a branch, tag or 40-hex commit) and the folder")
    if isinstance(e, RemoteEntryNotFoundError):
        return ConfigError(f"{what}: HTTP {status}, no such folder in the dataset ({detail}): check the repo "
                           f"name, the revision and the folder")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return ConfigError(f"{what}: HTTP {status} ({detail}): check the repo name, the revision and the folder "
                           f"(a private or gated repo also answers so without a token: {auth})")
    if status in (401, 403):
        return ConfigError(f"{what}: HTTP {status}, not authorized ({detail}): for a private or gated dataset "
                           f"set HF_TOKEN to a token that has access ({auth})")
    return ConfigError(f"{what}: HTTP {status} from {redact_url(guard.last_url or guard.endpoint)} ({detail})")


def _clean(text, token):
    text = _CONTROL_RE.sub(" ", str(text)).strip()
    return text.replace(token, "<redacted>") if token else text


def _retry_wait(headers):
    """Seconds a 429/503 asks to wait (RateLimit `t=` when `r=0`, else Retry-After: seconds or an HTTP
    date), capped at RETRY_AFTER_MAX; None when it says nothing."""
    rl = headers.get("RateLimit") or ""
    m = re.search(r'"\w+"\s*;\s*r\s*=\s*(\d+)\s*;\s*t\s*=\s*(\d+)', rl)
    if m and int(m.group(1)) == 0:
        return min(float(m.group(2)), RETRY_AFTER_MAX)
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if seconds != seconds:          # nan
        return None
    return max(0.0, min(seconds, RETRY_AFTER_MAX))


# -----------------------------------------------------------------------------
# The guard: the rules above, applied to each request huggingface_hub sends during one of our calls

_GUARD = contextvars.ContextVar("shardstream_hub_guard", default=None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED = False


@dataclass
class _Guard:
    what: str
    endpoint: str
    token: str | None
    allow_insecure: bool
    tree_path: str | None = None        # URL path prefix of the tree API: answers there are checked pages
    folder: str = ""
    max_pages: int = MAX_TREE_PAGES
    pages: dict = field(default_factory=dict)       # page URL -> page number, so a link back is a loop
    paths: dict = field(default_factory=dict)       # path -> size listed, so a path listed twice is refused
    last_url: str | None = None

    def reset_listing(self):
        self.pages.clear()
        self.paths.clear()


def _install_client():
    """Give huggingface_hub our client, once per process (set_client_factory closes its current one)."""
    global _INSTALLED
    with _INSTALL_LOCK:
        if not _INSTALLED:
            huggingface_hub.set_client_factory(
                lambda: httpx2.Client(transport=_GuardedTransport(), follow_redirects=True, timeout=None))
            _INSTALLED = True


class _GuardedTransport(httpx2.BaseTransport):
    """httpx2's transport (per proxy, from the usual *_PROXY variables), holding each request made during a
    hub.py call to the guard's rules; other requests pass as huggingface_hub's own client sends them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._inner = {}

    def _transport(self, url):
        host = url.host or ""
        proxies = urllib.request.getproxies()
        proxy = proxies.get(url.scheme) or proxies.get("all")
        if proxy and urllib.request.proxy_bypass(host):
            proxy = None
        with self._lock:
            t = self._inner.get(proxy)
            if t is None:
                t = self._inner[proxy] = httpx2.HTTPTransport(proxy=proxy) if proxy else httpx2.HTTPTransport()
            return t

    def close(self):
        with self._lock:
            inner, self._inner = list(self._inner.values()), {}
        for t in inner:
            t.close()

    def handle_request(self, request):
        guard = _GUARD.get()
        if guard is None:
            if huggingface_hub.is_offline_mode():
                raise OfflineModeIsEnabled(f"Cannot reach {request.url}: offline mode is enabled. To disable it, "
                                           f"unset the `HF_HUB_OFFLINE` environment variable.")
            return self._transport(request.url).handle_request(request)
        url = str(request.url)
        if "/api/datasets/" not in request.url.path:
            # huggingface_hub's side requests (the agent-harness registry its user agent asks constants.ENDPOINT
            # for): answered here, so a listing sends nothing but the calls it makes, and never to another host
            return httpx2.Response(404, headers={"Content-Type": "text/plain"}, content=b"not sent by shardstream",
                                   request=request)
        if guard.last_url is not None:      # not the first request: a next-page link or a retry
            self._check_follow(guard, guard.last_url, url, "a next-page link")
        page_key = None
        if guard.tree_path and request.url.path.startswith(guard.tree_path):
            page_key = url
            if page_key in guard.pages:
                raise ConfigError(f"{guard.what}: the tree listing's next-page link on page {len(guard.pages)} loops "
                                  f"back to page {guard.pages[page_key]} ({redact_url(url)}): the server is broken "
                                  f"(is HF_ENDPOINT={redact_url(guard.endpoint)} the Hub?)")
            if len(guard.pages) >= guard.max_pages:
                raise ConfigError(f"{guard.what}: the tree listing runs to more than {guard.max_pages} pages (next "
                                  f"{redact_url(url)}): its next-page links do not end (is HF_ENDPOINT="
                                  f"{redact_url(guard.endpoint)} the Hub?)")
        for _ in range(MAX_REDIRECTS + 1):
            guard.last_url = url
            status, headers, body = self._send(guard, request)
            if status in (301, 302, 303, 307, 308) and "location" in headers:
                target = self._check_follow(guard, url, headers["location"], "a redirect")
                request = self._redirected(guard, request, target, status)
                url = target
                continue
            break
        else:
            raise ConfigError(f"{guard.what}: more than {MAX_REDIRECTS} redirects from the Hub's API (last "
                              f"{redact_url(url)})")
        if page_key is not None and status == 200:
            guard.pages[page_key] = len(guard.pages) + 1
            body = self._checked_page(guard, url, body)
        if status in (429, 503):
            headers = _capped_waits(headers)
        return httpx2.Response(status, headers=headers, content=body, request=request)

    def _send(self, guard, request):
        """(status, headers without content-encoding/length, the decoded body), within the deadline and cap."""
        request.extensions = {**request.extensions, "timeout": {"connect": API_TIMEOUT[0], "read": API_TIMEOUT[1],
                                                                "write": API_TIMEOUT[1], "pool": API_TIMEOUT[0]}}
        if url_origin(str(request.url)) != url_origin(guard.endpoint):
            request.headers.pop("Authorization", None)      # the token is for HF_ENDPOINT's origin only
        deadline = time.monotonic() + API_DEADLINE
        try:
            resp = self._transport(request.url).handle_request(request)
        except httpx2.TransportError as e:
            raise _Unreachable(_clean(f"{type(e).__name__}: {e}", guard.token)) from None
        try:
            chunks, total = [], 0
            for chunk in resp.iter_bytes():         # decoded (gzip...), so the cap holds for what is parsed
                total += len(chunk)
                if total > MAX_API_BYTES:
                    raise ConfigError(f"{guard.what}: the answer from {redact_url(str(request.url))} is larger than "
                                      f"{MAX_API_BYTES >> 20} MiB (is HF_ENDPOINT the Hub?)")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise _SlowAnswer(f"the answer from {redact_url(str(request.url))} took longer than "
                                      f"{API_DEADLINE:g} s")
        except httpx2.TransportError as e:
            raise _Unreachable(_clean(f"{type(e).__name__}: {e}", guard.token)) from None
        finally:
            resp.close()
        headers = {k.lower(): v for k, v in resp.headers.items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")}
        return resp.status_code, headers, b"".join(chunks)

    @staticmethod
    def _check_follow(guard, base, link, kind):
        target, why = follow_target(base, link, guard.allow_insecure)
        if why:
            raise ConfigError(f"{guard.what}: refused {kind} from {redact_url(base)} to {why}")
        return target

    @staticmethod
    def _redirected(guard, request, target, status):
        method = request.method if status in (307, 308) else "GET"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        return httpx2.Request(method, target, headers=headers, extensions=request.extensions)

    @staticmethod
    def _checked_page(guard, url, body):
        """The page's body, once every entry passed _tree_entry; ConfigError otherwise."""
        try:
            page = json.loads(body)
        except (ValueError, RecursionError):
            raise ConfigError(f"{guard.what}: {redact_url(url)} did not answer JSON (is HF_ENDPOINT the Hub?)") \
                from None
        if not isinstance(page, list):
            raise ConfigError(f"{guard.what}: the tree answer from {redact_url(url)} is not a list but "
                              f"{_show(page)} (is HF_ENDPOINT the Hub?)")
        for n, entry in enumerate(page):
            where = f"{guard.what}: tree entry {n} of {redact_url(url)}"
            listed = _tree_entry(entry, guard.folder, where)
            if listed is None:
                continue
            path, size = listed
            if path in guard.paths:
                raise ConfigError(f"{where} lists {path!r} twice (with size {guard.paths[path]}, then {size}): the "
                                  f"listing is inconsistent, so no size or sha256 of it can be trusted; try again "
                                  f"later")
            guard.paths[path] = size
        return json.dumps([_for_hf(e) for e in page]).encode()


def _capped_waits(headers):
    """headers with Retry-After / RateLimit's t= capped at RETRY_AFTER_MAX seconds (an HTTP-date Retry-After,
    which huggingface_hub ignores, becomes seconds), so huggingface_hub's backoff never sleeps longer."""
    out = dict(headers)
    wait = _retry_wait({"Retry-After": headers.get("retry-after", "")})
    if wait is not None:
        out["retry-after"] = str(int(wait))
    if "ratelimit" in out:
        out["ratelimit"] = _RATELIMIT_T_RE.sub(lambda m: m.group(1) + str(min(int(m.group(2)), int(RETRY_AFTER_MAX))),
                                               out["ratelimit"])
    return out


def _for_hf(entry):
    """A checked entry with the fields huggingface_hub's RepoFile / RepoFolder require and we do not (the git
    oid, lfs size and pointer size) filled in when a server left them out."""
    out = {**entry, "oid": entry.get("oid") if isinstance(entry.get("oid"), str) else ""}
    if entry.get("type") == "file" and entry.get("lfs"):
        lfs = entry["lfs"]
        out["lfs"] = {**lfs, "size": lfs.get("size", entry["size"]), "pointerSize": lfs.get("pointerSize", 0)}
    return out


def _tree_entry(entry, folder, where):
    """(path relative to the repo, size) of one file entry, None for a directory; ConfigError naming the entry
    for anything malformed. A path that is no safe path is left for listing.py / manifest.py to refuse."""
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
    return path, size


def _show(obj, limit=120):
    """A bounded, printable rendering of untrusted JSON for an error message."""
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError):
        text = repr(obj)
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."
