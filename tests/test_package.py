"""The package front: `import shardstream` is light, and the public names load on first use."""
import subprocess
import sys


def test_public_names_load_lazily():
    code = ("import sys, shardstream\n"
            "assert 'shardstream.downloader' not in sys.modules and 'shardstream.status' not in sys.modules\n"
            "from shardstream import (StreamingDownloader, WindowPolicy, FailurePolicy, DiskPolicy, "
            "PrefetchPolicy, DownloaderStatus, make_source, ShardReader)\n"
            "assert 'shardstream.listing' in sys.modules and callable(make_source)\n"
            "from shardstream.downloader import StreamingDownloader as S, WindowPolicy as W\n"
            "from shardstream.prefetch import PrefetchPolicy as P\n"
            "from shardstream.status import DownloaderStatus as D\n"
            "assert (StreamingDownloader, WindowPolicy, PrefetchPolicy, DownloaderStatus) == (S, W, P, D)\n"
            "assert FailurePolicy().mode == 'fail' and DiskPolicy().min_free_bytes > 0\n"
            "assert 'WindowPolicy' in dir(shardstream)\n"
            "try:\n    shardstream.Nope\nexcept AttributeError as e:\n    assert 'Nope' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
