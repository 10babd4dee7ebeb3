"""`shardstream bench`: listing and running bench/<NAME>.py scripts (with a throwaway bench dir)."""
import ast
import re

import pytest

from shardstream import bench
from shardstream.cli import main
from shardstream.errors import ConfigError


def test_lists_the_repo_benchmarks(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "fetch" in out and "curl" in out        # bench/fetch.py's docstring line


# internal work items ("issue 7", "step 2", "the seed's ...") mean nothing to a user
INTERNAL = re.compile(r"\b(issue|step|item|task|ticket)\s*#?\d|\bthis issue\b|\bthe seed\b", re.I)


def test_listed_descriptions_are_whole_sentences(capsys, monkeypatch):
    benches = bench.list_benches()
    assert len(benches) >= 6
    for name, doc in benches.items():
        text = ast.get_docstring(ast.parse((bench.BENCH_DIR / f"{name}.py").read_text()))
        first = text.split("\n\n")[0]
        assert doc == " ".join(first.split()), name            # the whole first paragraph, not its first line
        assert doc.endswith("."), f"bench/{name}.py: {doc!r} is not a whole sentence"
        # one line, so each script's own --help (its first docstring line) is whole too
        assert "\n" not in first, f"bench/{name}.py: the docstring's first paragraph spans lines"
        assert not INTERNAL.search(text), f"bench/{name}.py mentions {INTERNAL.search(text).group(0)!r}"
    # a narrow terminal wraps at word boundaries: the continuation lines put back give each description whole
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["bench"]) == 0
    listed, name = {}, None
    for line in capsys.readouterr().out.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith(" " * 19):
            name, _, rest = line.strip().partition(" ")
            listed[name] = rest.strip()
        else:
            listed[name] += " " + line.strip()
        assert len(line) <= 60, line
    assert listed == benches


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    assert "no_such_bench" in capsys.readouterr().err


def test_runs_a_script_with_its_options_and_returns_its_exit_code(tmp_path):
    (tmp_path / "echo.py").write_text('"""Echo args."""\nimport sys\nopen(sys.argv[1], "w").write(" ".join(sys.argv[2:]))\n'
                                      'sys.exit(3)\n')
    (tmp_path / "_helper.py").write_text("")
    assert bench.list_benches(tmp_path) == {"echo": "Echo args."}
    out = tmp_path / "out.txt"
    assert bench.run_bench("echo", [str(out), "--quick"], bench_dir=tmp_path) == 3
    assert out.read_text() == "--quick"
    with pytest.raises(ConfigError, match="no bench/ directory"):
        bench.list_benches(tmp_path / "missing")


@pytest.mark.slow
def test_fetch_bench_quick_prints_the_ratio(capfd):
    assert main(["bench", "fetch", "--quick", "--repeats", "1", "--parallel", "2"]) == 0
    assert "ratio fetch/curl" in capfd.readouterr().out
