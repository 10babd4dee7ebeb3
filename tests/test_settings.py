"""settings.py owns every environment variable: docs/NANOCHAT.md's table is its table, no other module reads
os.environ, library objects do not change with the shell, typos are warned about, bad values name the variable."""
import ast
import logging
from pathlib import Path

import pytest

from shardstream import settings
from shardstream.errors import ConfigError
from shardstream.settings import BY_NAME, SETTINGS, markdown_rows, read, read_all, unknown_variables

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "shardstream"

# modules that may touch os.environ without reading a setting, and why
ENVIRON_ALLOWED = {
    "settings.py": "the one reader of settings",
    "bench.py": "copies os.environ whole into a child process's env (dict(os.environ)); reads no variable",
    # the Hub helper's rework of hub.py reads HF_HUB_OFFLINE/HF_TOKEN/HF_HOME/HF_TOKEN_PATH/XDG_CACHE_HOME
    # directly; settings.FOREIGN lists them, so settings.foreign(name) replaces each read and this entry goes
    "hub.py": "the Hub's own variables, read as huggingface_hub reads them (to move to settings.foreign)",
}


def doc_rows():
    """The SHARDSTREAM_* rows of docs/NANOCHAT.md's variable table, as (name, default, meaning)."""
    text = (ROOT / "docs" / "NANOCHAT.md").read_text()
    table = text.split("| variable | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("`SHARDSTREAM_"):
            rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_the_docs_table_is_the_settings_table():
    rows = doc_rows()
    assert [r[0] for r in rows] == [s.name for s in SETTINGS]
    assert {name: default for name, default, _ in rows} == {s.name: s.shown for s in SETTINGS}
    text = (ROOT / "docs" / "NANOCHAT.md").read_text()
    assert all(row in text for row in markdown_rows())        # meanings too: regenerate with markdown_rows()


def test_defaults_shown_are_the_librarys_constants():
    from shardstream.fetch import VERIFY_LEVELS
    from shardstream.shards import DATASETS, DEFAULT_DATASET
    from shardstream.torchrun import DEFAULT_TIMEOUT
    from shardstream.verify import DEFAULT_MAX_ROW_GROUP_BYTES, DEFAULT_MAX_ROW_GROUP_ROWS
    assert settings.DATASET_NAMES == tuple(DATASETS) and read("SHARDSTREAM_DATASET", {}) == DEFAULT_DATASET
    assert settings.VERIFY_LEVELS == tuple(VERIFY_LEVELS)
    assert BY_NAME["SHARDSTREAM_MAX_ROW_GROUP_BYTES"].shown.startswith(f"`{DEFAULT_MAX_ROW_GROUP_BYTES}`")
    assert BY_NAME["SHARDSTREAM_MAX_ROW_GROUP_ROWS"].shown == f"`{DEFAULT_MAX_ROW_GROUP_ROWS}`"
    assert BY_NAME["SHARDSTREAM_DIST_TIMEOUT"].shown == f"`{DEFAULT_TIMEOUT:g}`"
    for s in SETTINGS:              # a default the docs show as a value parses to the setting's default
        value = s.shown.split("`")[1] if s.shown.startswith("`") else None
        if s.parse is not None and value is not None and s.default is not None and not value.startswith("$"):
            assert s.parse(value) == s.default, s.name


def environ_uses(path):
    """Line numbers where a module's source touches os.environ / os.getenv / environ.get / putenv."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
            hits.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "putenv") for a in node.names):
            hits.append(node.lineno)
    return hits


def test_only_settings_reads_the_environment():
    found = {f.name: environ_uses(f) for f in sorted(PKG.glob("*.py"))}
    assert found["settings.py"] and found["bench.py"]       # the scan sees what it looks for
    offenders = {name: lines for name, lines in found.items() if lines and name not in ENVIRON_ALLOWED}
    assert not offenders, f"read the variable through shardstream/settings.py instead: {offenders}"


def test_the_scan_catches_each_form(tmp_path):
    for code in ("import os\nx = os.environ.get('A')", "import os\nx = os.getenv('A')",
                 "from os import environ\nx = environ['A']", "import os\nos.environ['A'] = '1'"):
        (tmp_path / "m.py").write_text(code)
        assert environ_uses(tmp_path / "m.py"), code


@pytest.fixture
def shell(monkeypatch, tmp_path):
    """A shell exporting drop-in settings that a library object must not pick up."""
    env = {"SHARDSTREAM_SOURCE": "http://127.0.0.1:9/elsewhere", "SHARDSTREAM_DATA_DIR": str(tmp_path / "env_dir"),
           "SHARDSTREAM_BUFFER_SIZE": "9", "SHARDSTREAM_WORKERS": "7", "SHARDSTREAM_MAX_CACHE_BYTES": "1GB",
           "SHARDSTREAM_TOTAL_SHARDS": "3", "SHARDSTREAM_DATASET": "fineweb-edu",
           "SHARDSTREAM_MAX_ROW_GROUP_BYTES": "1", "SHARDSTREAM_MAX_ROW_GROUP_ROWS": "1",
           "SHARDSTREAM_DIST_TIMEOUT": "1", "SHARDSTREAM_DATASET_SHARDS": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_a_bare_downloader_is_the_same_whatever_the_shell_exports(monkeypatch, tmp_path, shell):
    from shardstream.downloader import StreamingDownloader

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))   # nanochat's own variable still counts

    def bare():
        dl = StreamingDownloader()          # constructed, never started: no request is made
        return (dl.source.base_url, dl.source.dataset_shards, str(dl.data_dir), dl.window.buffer_size,
                dl.window.max_cache_bytes, dl.total_shards)

    with_shell = bare()
    for k in shell:
        monkeypatch.delenv(k)
    assert with_shell == bare()
    assert with_shell[0].startswith("https://huggingface.co/datasets/karpathy/climbmix")
    assert with_shell[2] == str(tmp_path / "base" / "base_data_climbmix")


def test_library_functions_take_arguments_not_the_shell(shell):
    from shardstream.listing import make_source
    from shardstream.shards import default_data_dir
    from shardstream.verify import RowGroupLimits, row_group_limits
    assert "climbmix" in make_source(None).base_url
    assert "elsewhere" not in make_source(None).base_url
    assert default_data_dir().name == "base_data_climbmix"
    assert row_group_limits() == RowGroupLimits()
    assert read("SHARDSTREAM_DIST_TIMEOUT") == 1.0              # ... while the setting itself is there to read


def test_unknown_variables_are_typos_only(caplog):
    env = {"SHARDSTREAM_MAX_ROW_GROUP_BYTES": "1000000000", "SHARDSTREAM_DIST_TIMEOUT": "30",
           "SHARDSTREAM_SHARE_STATE": "0", "SHARDSTREAM_TORCH": "torch", "SHARDSTREAM_BUFER_SIZE": "3",
           "SHARDSTREAM_XYZZY": "1", "HF_TOKEN": "x"}
    assert unknown_variables(env) == [("SHARDSTREAM_BUFER_SIZE", "SHARDSTREAM_BUFFER_SIZE"),
                                      ("SHARDSTREAM_XYZZY", None)]
    assert unknown_variables({s.name: "1" for s in SETTINGS}) == []       # every setting is known
    with caplog.at_level(logging.WARNING):
        settings.warn_unknown(env)
    assert "SHARDSTREAM_BUFER_SIZE is not a shardstream variable" in caplog.text
    assert "did you mean SHARDSTREAM_BUFFER_SIZE?" in caplog.text
    assert "SHARDSTREAM_MAX_ROW_GROUP_BYTES" not in caplog.text


def test_the_drop_in_warns_only_about_typos(tmp_path, caplog):
    from shardstream.streaming_env import StreamingSettings
    with caplog.at_level(logging.WARNING):
        s = StreamingSettings.from_env({"SHARDSTREAM_DATA_DIR": str(tmp_path), "SHARDSTREAM_DIST_TIMEOUT": "30",
                                        "SHARDSTREAM_MAX_ROW_GROUP_BYTES": "1000000000",
                                        "SHARDSTREAM_MAX_ROW_GROUP_ROWS": "5", "SHARDSTREAM_SHARE_STATE": "0",
                                        "SHARDSTREAM_BUFER_SIZE": "3"})
    assert (s.dist_timeout, s.max_row_group_bytes, s.max_row_group_rows, s.share_state) == (30.0, 10**9, 5, False)
    assert "not a shardstream variable" in caplog.text and "SHARDSTREAM_BUFER_SIZE" in caplog.text
    assert "SHARDSTREAM_MAX_ROW_GROUP" not in caplog.text and "SHARDSTREAM_DIST_TIMEOUT" not in caplog.text


@pytest.mark.parametrize("name, value, needle", [
    ("SHARDSTREAM_WORKERS", "0", "int >= 1"),
    ("SHARDSTREAM_BUFFER_SIZE", "lots", "or auto"),
    ("SHARDSTREAM_MAX_CACHE_BYTES", "20XB", "disk budget like 20GB"),
    ("SHARDSTREAM_DIST_TIMEOUT", "-3", "seconds > 0"),
    ("SHARDSTREAM_DIST_TIMEOUT", "inf", "seconds > 0"),
    ("SHARDSTREAM_SHARE_STATE", "maybe", "1 or 0"),
    ("SHARDSTREAM_MAX_ROW_GROUP_BYTES", "512MB", "positive integer"),
    ("SHARDSTREAM_STREAMING", "yes please", "write 1"),
    ("SHARDSTREAM_DATASET", "nope", "climbmix, fineweb-edu"),
    ("SHARDSTREAM_VERIFY", "all", "footer or decode"),
    ("SHARDSTREAM_FETCH_PROCESS", "sometimes", "auto, 1 or 0"),
])
def test_a_bad_value_names_the_variable_the_value_and_what_to_write(name, value, needle):
    with pytest.raises(ConfigError) as e:
        read(name, {name: value})
    msg = str(e.value)
    assert msg.startswith(f"{name}={value!r}: ") and needle in msg


def test_read_all_lists_every_bad_variable_and_unset_means_default():
    with pytest.raises(ConfigError) as e:
        read_all(["SHARDSTREAM_WORKERS", "SHARDSTREAM_RETAIN", "SHARDSTREAM_VERIFY"],
                 {"SHARDSTREAM_WORKERS": "x", "SHARDSTREAM_RETAIN": "-1", "SHARDSTREAM_VERIFY": "decode"})
    assert "SHARDSTREAM_WORKERS='x'" in str(e.value) and "SHARDSTREAM_RETAIN='-1'" in str(e.value)
    assert "SHARDSTREAM_VERIFY" not in str(e.value)
    assert read_all(env={}) == {s.name: s.default for s in SETTINGS if s.parse is not None}
    assert read("SHARDSTREAM_WORKERS", {"SHARDSTREAM_WORKERS": "  "}) == 2          # empty: unset


def test_names_outside_the_tables_are_refused():
    with pytest.raises(KeyError, match="SHARDSTREAM_TORCH"):      # ./run reads it, not Python
        read("SHARDSTREAM_TORCH", {})
    with pytest.raises(KeyError, match="PATH"):
        settings.foreign("PATH", {})
    assert settings.hf_token({"HF_TOKEN": ""}) is None and settings.hf_token({"HF_TOKEN": "t"}) == "t"
    assert settings.torchrun_env({"RANK": "1", "PATH": "/bin"}) == {"RANK": "1"}


@pytest.mark.parametrize("value, process", [("auto", "auto"), ("AUTO", "auto"), ("1", True), ("0", False),
                                            (None, "auto")])
def test_fetch_process_reaches_the_drop_ins_fetch_policy(tmp_path, value, process):
    from shardstream.streaming_env import StreamingSettings
    env = {"SHARDSTREAM_DATA_DIR": str(tmp_path)} | ({"SHARDSTREAM_FETCH_PROCESS": value} if value else {})
    policy = StreamingSettings.from_env(env).downloader_kwargs("train")["fetch_policy"]
    assert policy.process == process
