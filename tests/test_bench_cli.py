"""`shardstream bench`: listing and running bench/<NAME>.py scripts (with a throwaway bench dir)."""
import pytest

from shardstream import bench
from shardstream.cli import main
from shardstream.errors import ConfigError


def test_lists_the_repo_benchmarks(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "fetch" in out and "curl" in out        # bench/fetch.py's docstring line


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
