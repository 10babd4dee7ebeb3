"""The HuggingFace Hub's API, as much as an hf:// source needs: the commit a revision names, and the
files of a dataset folder with their sizes and LFS sha256.

    repo, revision, folder = parse_hf_url("hf://datasets/karpathy/climbmix-400b-shuffle@main")
    sha = resolve_revision(repo, revision, token)      # GET /api/datasets/<repo>/revision/<revision>
    files = list_tree(repo, sha, folder, token)        # GET /api/datasets/<repo>/tree/<sha>[/<folder>]

Requests go to HF_ENDPOINT (default https://huggingface.co), with the token as a bearer token (requests
drops it on a redirect to another host, and a next-page link elsewhere gets none). A dropped connection, 429 or 5xx is retried a few times, then
TransientFetchError; 401/403/404 and answers that are not the Hub's JSON are ConfigErrors saying what
to check.
"""
import logging
import re
import time
from urllib.parse import quote, unquote, urlsplit

import requests

from .errors import ConfigError, TransientFetchError
from .source import RemoteInfo, hf_endpoint, redact_url

logger = logging.getLogger(__name__)

API_ATTEMPTS = 4
API_TIMEOUT = (10, 60)          # connect, read (seconds)
HF_URL_RE = re.compile(r"^hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?$")


def parse_hf_url(url):
    """'hf://datasets/ORG/NAME[@REVISION][/FOLDER]' -> (repo 'ORG/NAME', revision (default main), folder)."""
    m = HF_URL_RE.match(url)
    if not m:
        raise ConfigError(f"source {url!r} is not an hf:// dataset URL: write hf://datasets/ORG/NAME, "
                          f"optionally @REVISION (branch, tag or commit) and /FOLDER")
    org, name, revision, folder = m.groups()
    return f"{org}/{name}", unquote(revision or "main"), (folder or "").strip("/")


def resolve_revision(repo, revision="main", token=None):
    """The commit sha that `revision` (a branch, tag or sha) of dataset `repo` names now."""
    url = f"{hf_endpoint()}/api/datasets/{repo}/revision/{quote(revision, safe='')}"
    data, _ = _get_json(url, token, f"hf://datasets/{repo}@{revision}")
    sha = data.get("sha") if isinstance(data, dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise ConfigError(f"hf://datasets/{repo}@{revision}: the Hub's answer has no commit sha "
                          f"(is HF_ENDPOINT={hf_endpoint()} the Hub?)")
    return sha


def list_tree(repo, sha, folder="", token=None):
    """{file name: RemoteInfo(size, sha256 of LFS files, etag None)} of one folder at commit sha."""
    url = f"{hf_endpoint()}/api/datasets/{repo}/tree/{sha}"
    if folder:
        url += "/" + quote(folder)
    what = f"hf://datasets/{repo}@{sha[:12]}" + (f"/{folder}" if folder else "")
    files = {}
    while url:
        page, url = _get_json(url, token, what)
        if not isinstance(page, list):
            raise ConfigError(f"{what}: the Hub's tree answer is not a list (is HF_ENDPOINT the Hub?)")
        for entry in page:
            if entry.get("type") != "file":
                continue
            lfs = entry.get("lfs") or {}
            files[entry["path"].rsplit("/", 1)[-1]] = RemoteInfo(size=entry.get("size"), sha256=lfs.get("oid"),
                                                                 etag=None)
    return files


def _get_json(url, token, what):
    """(JSON body, URL of the next page or None), retrying network failures, 429 and 5xx."""
    hub_host = urlsplit(hf_endpoint()).hostname
    headers = {"Authorization": f"Bearer {token}"} if token and urlsplit(url).hostname == hub_host else {}
    cause = None
    for attempt in range(1, API_ATTEMPTS + 1):
        if attempt > 1:
            time.sleep(min(8.0, 0.5 * 2 ** (attempt - 2)))
        try:
            resp = requests.get(url, headers=headers, timeout=API_TIMEOUT)
        except requests.RequestException as e:
            cause = f"{type(e).__name__}: {e}".replace(token or "\0", "<redacted>")
            logger.info("%s: the Hub's API did not answer (%s); retrying", what, cause)
            continue
        with resp:
            code = resp.status_code
            if code == 200:
                try:
                    return resp.json(), resp.links.get("next", {}).get("url")
                except ValueError:
                    raise ConfigError(f"{what}: {redact_url(url)} did not answer JSON (is HF_ENDPOINT the Hub?)") \
                        from None
            detail = resp.text[:200].strip()
            if code in (401, 403):
                raise ConfigError(f"{what}: HTTP {code}, not authorized: for a private or gated dataset set "
                                  f"HF_TOKEN to a token that has access ({detail})")
            if code == 404:
                raise ConfigError(f"{what}: HTTP 404 ({detail}): check the repo name, the revision and the "
                                  f"folder (a private repo also answers 404 without a token)")
            if code != 429 and code < 500:
                raise ConfigError(f"{what}: HTTP {code} from {redact_url(url)} ({detail})")
            cause = f"HTTP {code}"
    raise TransientFetchError(f"{what}: the Hub's API failed {API_ATTEMPTS} times ({cause}); try again later",
                              url=redact_url(url), attempts=API_ATTEMPTS, cause=cause)
