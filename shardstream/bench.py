"""`shardstream bench [NAME...]`: run the benchmarks in the repo checkout's bench/ directory.

    shardstream bench                  # list them
    shardstream bench fetch --quick    # run bench/fetch.py --quick (options after the names go to each)

Benchmarks are plain scripts (`bench/<NAME>.py`, each opening with a docstring saying what it measures)
that print their figures and ratios; they live in a checkout of the repository, not in the installed
package, so this command looks for bench/ next to the package directory.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"


def list_benches(bench_dir=BENCH_DIR):
    """{name: the first paragraph of its docstring, on one line} of bench/<name>.py scripts."""
    if not bench_dir.is_dir():
        raise ConfigError(f"no bench/ directory at {bench_dir}: the benchmarks live in a checkout of the "
                          f"shardstream repository (git clone it and run `shardstream bench` from there)")
    out = {}
    for p in sorted(bench_dir.glob("*.py")):
        if p.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        except SyntaxError:
            doc = "(does not parse)"
        out[p.stem] = " ".join(doc.strip().split("\n\n")[0].split())     # whole, never cut at a line end
    return out


def run_bench(name, args=(), bench_dir=BENCH_DIR):
    """Run bench/<name>.py with args in this Python, the checkout first on the path. Returns its exit code."""
    benches = list_benches(bench_dir)
    name = name[:-3] if name.endswith(".py") else name
    if name not in benches:
        raise ConfigError(f"no benchmark {name!r} in {bench_dir}: choose one of {', '.join(benches) or '(none)'}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bench_dir.parent), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, str(bench_dir / f"{name}.py"), *args], env=env).returncode


def cli(argv):
    p = argparse.ArgumentParser(prog="shardstream bench",
                                description="Run the benchmarks in bench/ (no NAME: list them). Options after "
                                            "the names (e.g. --quick) are passed to each benchmark.")
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmark(s) to run, e.g. fetch")
    args, extra = p.parse_known_args(argv)
    try:
        benches = list_benches()
        if not args.names:
            print("benchmarks (run with `shardstream bench NAME [--quick]`):")
            width = max(shutil.get_terminal_size((100, 24)).columns, 60)
            for name, doc in benches.items():
                # wrapped at word boundaries to the terminal, continuation lines under the description
                print(textwrap.fill(doc, width, initial_indent=f"  {name:<16} ", subsequent_indent=" " * 19,
                                    break_long_words=False, break_on_hyphens=False))
            return 0
        for name in args.names:             # check them all before running any
            if name.removesuffix(".py") not in benches:
                raise ConfigError(f"no benchmark {name!r} in {BENCH_DIR}: choose one of {', '.join(benches)}")
        worst = 0
        for name in args.names:
            print(f"== bench/{name.removesuffix('.py')}.py {' '.join(extra)}".rstrip(), flush=True)
            worst = max(worst, run_bench(name, extra))
        return worst
    except ConfigError as e:
        print(f"shardstream bench: {e}", file=sys.stderr)
        return 2
