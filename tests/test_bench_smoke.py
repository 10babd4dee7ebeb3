"""The performance suite's smoke mode runs end to end and prints its summary table (figures are not
checked here: they depend on the machine; bench/RESULTS.md records them)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_suite_smoke_runs_and_prints_its_table():
    only = ["streaming", "epochs", "loader", "resume"]
    if shutil.which("curl"):                    # the transfer benchmark's baseline is curl
        only.insert(0, "fetch")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run_all.py"), "--smoke", "--only", ",".join(only)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "SUMMARY" in out and "case" in out and "target" in out, out[-3000:]
    for name in only:
        assert f"-- bench/{name}.py:" in out, name
    assert "streaming W/R=1.25 adaptive" in out            # the streaming table made it into the summary
    assert "epochs x3" in out and "resume is exact" in out
