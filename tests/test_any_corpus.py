"""Issue 15's "done when": any parquet corpus streams, not only shard_XXXXX.parquet.

A FineWeb-like tree (nested folders, other names, a README, non-text columns) is served through the Hub's
API by the local server; its sample/10BT files stream through the StreamingDownloader and the loader under
a disk budget with batches bitwise equal to the same files read locally in manifest order, resume exactly,
work from a gated repo with the token `hf auth login` saved, and train the reference trainer end to end
with --val-files none. nanochat's layout needs no new flag (a check here; the rest of the suite covers it).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rel_common import isolate_hub_env
from nanochat_like import ByteTokenizer, digest
from shardstream.downloader import StreamingDownloader
from shardstream.errors import ConfigError
from shardstream.listing import make_source
from shardstream.loader import tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_fn
from shardstream.sample import FINEWEB_FILES, make_fineweb_sample
from shardstream.server import ShardServer

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "HuggingFaceFW/fineweb-like"
URL = f"hf://datasets/{HUB_REPO}"
FILES = "sample/10BT/*.parquet"
TRAIN = [f"sample/10BT/000_0000{i}.parquet" for i in range(3)]      # sorted paths; the last file is val
VAL = "sample/10BT/000_00003.parquet"
TOKEN = "hf_GATEDtok3n_0123456789abcdef"
KW = dict(B=4, T=64, tokenizer_threads=1, tokenizer_batch_size=8, buffer_size=16, device="cpu")
BATCHES = 120                   # > 2 epochs of the 3 train files: evicted files come back


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("fineweb")
    make_fineweb_sample(d, chars_per_file=20_000, docs_per_row_group=4)
    return d


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    isolate_hub_env(monkeypatch, tmp_path)


@pytest.fixture
def hub(tree, monkeypatch):
    with ShardServer(tree, hub_repo=HUB_REPO) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        yield srv


@pytest.fixture(scope="module")
def local(tree, tmp_path_factory):
    """The same files copied by hand into a nanochat-layout dir in manifest order (train, then val), read
    by the loader's local mode: (batch digests, the dir)."""
    d = tmp_path_factory.mktemp("manifest-order")
    for i, path in enumerate(TRAIN + [VAL]):
        shutil.copy(tree / path, d / f"shard_{i:05d}.parquet")
    return take(loader_fn(ByteTokenizer(), split="train", data_dir=d, **KW), BATCHES), d


def take(gen, n):
    out = []
    try:
        for _ in range(n):
            x, y, state = next(gen)
            out.append((digest(x, y), json.dumps(state, sort_keys=True)))
    finally:
        gen.close()
    return out


def disk_peak(data_dir):
    events = [json.loads(line) for line in (data_dir / ".shardstream" / "events.jsonl").read_text().splitlines()
              if line.strip()]
    return max(e["bytes_on_disk"] for e in events if "bytes_on_disk" in e)


def budget_for(tree):
    """Room for the val file and about two train files: less than the four."""
    sizes = [(tree / p).stat().st_size for p in TRAIN + [VAL]]
    budget = sizes[-1] + int(2.3 * max(sizes[:-1]))
    assert budget < sum(sizes)
    return budget


def downloader(source, data_dir, budget):
    return StreamingDownloader(source=source, data_dir=data_dir, buffer_size=1, max_cache_bytes=budget,
                               progress=False)


# ---------------------------------------------------------------------------------------------------
# Through the Hub's API, under a budget

def test_the_hub_source_streams_the_manifest_under_a_budget_bitwise(hub, tree, local, tmp_path):
    src = make_source(URL, files=[FILES])
    m = src.manifest
    assert [e.path for e in m.train] == TRAIN and [e.path for e in m.val] == [VAL]
    assert src.num_train_shards == 3 and src.val_shards == (3,)
    assert src.identity()["source"].startswith(f"{URL}@{hub.revision}#manifest-")
    budget = budget_for(tree)
    data = tmp_path / "data"
    with downloader(src, data, budget) as dl:
        streamed = take(loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, **KW), BATCHES)
    assert [h for h, _ in streamed] == [h for h, _ in local[0]]         # bitwise the files in manifest order
    assert json.loads(streamed[-1][1])["epoch"] >= 2
    assert disk_peak(data) <= budget
    names = {p.name for p in data.iterdir() if p.is_file()}
    assert names <= {src.file_name(i) for i in range(4)}                # cache names, never a source path
    assert all(not n.startswith("shard_") for n in names)
    assert hub.stats(TRAIN[0]).get_requests >= 2                        # evicted under the budget, fetched again
    for other in FINEWEB_FILES:                                         # data/CC-MAIN-*: listed, never read
        if not other.startswith("sample/"):
            assert hub.stats(other).get_requests == 0


def test_an_interrupted_run_resumes_exactly(hub, tree, tmp_path):
    src = make_source(URL, files=[FILES])
    budget = budget_for(tree)
    with downloader(src, tmp_path / "a", budget) as dl:
        full = take(loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, **KW), 90)
    # interrupted after k batches; a new process (a fresh source listing, a fresh cache) resumes from the
    # state that came with batch k (nanochat's checkpoint holds the state of the batch the next step trains on)
    for k in (7, 61):
        state = json.loads(full[k][1])
        src2 = make_source(URL, files=[FILES])
        assert src2.identity() == src.identity()
        with downloader(src2, tmp_path / f"b{k}", budget) as dl:
            gen = loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, resume_state_dict=state, **KW)
            assert take(gen, 20) == full[k:k + 20]


def test_a_resume_state_belongs_to_its_file_set(hub, tmp_path):
    from shardstream.errors import StateMismatchError
    src = make_source(URL, files=[FILES])
    with downloader(src, tmp_path / "a", None) as dl:
        state = take(loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, **KW), 3)[-1][1]
    other = make_source(URL, files=[FILES], val_files="none")          # the same files, another split
    assert other.identity() != src.identity()
    with downloader(other, tmp_path / "b", None) as dl:
        with pytest.raises(StateMismatchError):
            loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, resume_state_dict=json.loads(state),
                      **KW)


def test_val_reads_the_val_files_and_none_means_no_val(hub, tmp_path):
    src = make_source(URL, files=[FILES])
    with downloader(src, tmp_path / "a", None) as dl:
        assert dl.val_shards == (3,) and dl.val_shard == 3
        val = take(loader_fn(ByteTokenizer(), split="val", streaming_downloader=dl, **KW), 3)
    solo = tmp_path / "solo"                  # the val file alone, read locally, gives the same rows
    solo.mkdir()
    shutil.copy(hub.directory / VAL, solo / "shard_00001.parquet")
    shutil.copy(hub.directory / TRAIN[0], solo / "shard_00000.parquet")
    assert [h for h, _ in val] == [h for h, _ in take(loader_fn(ByteTokenizer(), split="val", data_dir=solo, **KW), 3)]
    src = make_source(URL, files=[FILES], val_files="none")
    assert src.num_train_shards == 4 and src.val_shards == ()
    with downloader(src, tmp_path / "b", None) as dl:
        assert dl.val_shard is None
        with pytest.raises(ConfigError, match="val"):
            next(loader_fn(ByteTokenizer(), split="val", streaming_downloader=dl, **KW))


def test_a_gated_repo_works_with_the_token_hf_auth_login_saved(tree, local, tmp_path, monkeypatch):
    with ShardServer(tree, hub_repo=HUB_REPO, token=TOKEN) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        with pytest.raises(ConfigError, match="gated.*hf auth login") as e:
            make_source(URL, files=[FILES])
        assert TOKEN not in str(e.value)
        home = tmp_path / "hf-home"
        home.mkdir()
        (home / "token").write_text(TOKEN + "\n")                       # what `hf auth login` writes
        src = make_source(URL, files=[FILES])
        with downloader(src, tmp_path / "data", None) as dl:
            streamed = take(loader_fn(ByteTokenizer(), split="train", streaming_downloader=dl, **KW), 30)
        assert [h for h, _ in streamed] == [h for h, _ in local[0][:30]]
        got = [r for r in srv.requests if r.status == 200]
        auths = {{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in got}
        assert got and auths == {f"Bearer {TOKEN}"}
        assert TOKEN not in json.dumps(streamed) and TOKEN not in (tmp_path / "data" / ".shardstream" /
                                                                   "events.jsonl").read_text()


def test_nanochat_layout_needs_no_new_flag(sample_dir, tmp_path):
    src = make_source(str(sample_dir))
    assert src.manifest is None and src.file_name(0) == "shard_00000.parquet"
    assert src.identity()["source"].count("#manifest-") == 0            # old resume states still match
    # picking exactly its shards keeps its names too
    assert make_source(str(sample_dir), files=["shard_*.parquet"]).file_name(5) == "shard_00005.parquet"


# ---------------------------------------------------------------------------------------------------
# The reference trainer, end to end

def trainer(hub, tmp, *extra):
    flags = ["--depth=1", "--max_seq_len=64", "--device_batch_size=4", "--num_iterations=6", "--vocab_size=512",
             "--streaming_mode=True", "--streaming_buffer_size=1", f"--source={URL}", f"--files={FILES}",
             f"--data_dir={tmp / 'data'}", f"--tokenizer_dir={tmp / 'tok'}", f"--checkpoint_dir={tmp / 'ckpt'}",
             f"--max_cache_bytes={budget_for(Path(hub.directory))}", "--eval_tokens=256", "--tokenizer_threads=1",
             "--status_every=2", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_ENDPOINT=hub.url)
    p = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    return p.returncode, p.stdout + p.stderr


def test_the_trainer_runs_on_the_fineweb_tree_without_val(hub, tmp_path):
    rc, out = trainer(hub, tmp_path, "--val-files", "none")
    assert rc == 0, out[-3000:]
    assert out.count("no val files (--val-files none): val loss is skipped") == 1
    assert "Validation loss" not in out
    assert "Manifest: 4 train + 0 val files" in out and "Fetching sample/10BT/000_00000.parquet" in out
    assert "step 00005/00006" in out and (tmp_path / "ckpt" / "step_000006.pt").is_file()
    assert disk_peak(tmp_path / "data") <= budget_for(Path(hub.directory))
    assert hub.stats("data/CC-MAIN-2024-10/000_00000.parquet").get_requests == 0
    # the same checkpoint against another file set is refused, naming it
    rc, out = trainer(hub, tmp_path, "--num_iterations=8", "--resume_from_step=6")
    assert rc == 2, out[-3000:]
    assert "cannot resume from step 6" in out and "the files differ" in out
    # and with its own files it goes on
    rc, out = trainer(hub, tmp_path, "--val_files=none", "--num_iterations=8", "--resume_from_step=6")
    assert rc == 0, out[-3000:]
    assert "step 00007/00008" in out


def test_the_trainer_reads_another_text_column_from_a_local_folder(tmp_path, caplog):
    """The README's S3 example, from a local folder: train/ and val/ globs, the documents in `content`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from shardstream.sample import make_documents
    from shardstream.train import main
    corpus = tmp_path / "corpus"
    for k, rel in enumerate(["train/0.parquet", "train/1.parquet", "train/2.parquet", "val/0.parquet"]):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        docs = make_documents(40, 40_000, seed=[5, k])
        pq.write_table(pa.table({"id": list(range(len(docs))), "content": docs}), corpus / rel, row_group_size=10)
    flags = ["--depth=1", "--max_seq_len=64", "--device_batch_size=4", "--num_iterations=3", "--vocab_size=512",
             "--streaming_mode=True", f"--source={corpus}", "--files=train/**/*.parquet", "--val-files=val/*.parquet",
             f"--tokenizer_dir={tmp_path / 'tok'}", f"--checkpoint_dir={tmp_path / 'ckpt'}", "--eval_tokens=256",
             "--tokenizer_threads=1"]
    caplog.set_level("INFO", logger="shardstream.train")
    assert main(flags + ["--text-column=content", f"--data_dir={tmp_path / 'data'}"]) == 0
    assert "Manifest: 3 train + 1 val files" in caplog.text and "Validation loss" in caplog.text
    caplog.clear()
    assert main(flags + ["--text-column=body", f"--data_dir={tmp_path / 'data2'}",
                         f"--tokenizer_dir={tmp_path / 'tok2'}"]) != 0
    assert "`body`" in caplog.text and "content" in caplog.text
