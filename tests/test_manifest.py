"""manifest.py: globs, selection (nanochat's layout, --files, --val-files), cache names, the digest, and
manifest files. Pure functions over data: tables in, tables out."""
import re

import pytest

from shardstream.errors import ConfigError
from shardstream.manifest import (Manifest, ManifestEntry, cache_name, entries_from_listing, glob_match,
                                  is_cache_name, parse_manifest_file, path_problem, select)
from shardstream.shards import shard_name
from shardstream.source import RemoteInfo

GLOBS = [
    # pattern, path, matches
    ("*.parquet", "a.parquet", True),
    ("*.parquet", "d/a.parquet", False),                 # * stays within one step
    ("**/*.parquet", "a.parquet", True),                 # ** is zero steps too
    ("**/*.parquet", "data/CC-MAIN-2024-10/000_00000.parquet", True),
    ("data/**/*.parquet", "data/x.parquet", True),
    ("data/**/*.parquet", "data/a/b/x.parquet", True),
    ("data/**/*.parquet", "sample/x.parquet", False),
    ("data/**", "data/a/b", True),
    ("data/**", "database/a", False),
    ("sample/10BT/*.parquet", "sample/10BT/000_00000.parquet", True),
    ("sample/10BT/*.parquet", "sample/10BT/sub/000_00000.parquet", False),
    ("sample/*/0??_00000.parquet", "sample/10BT/000_00000.parquet", True),
    ("?.parquet", "/.parquet", False),                   # ? never matches /
    ("a?b", "a/b", False),
    ("[ab].parquet", "a.parquet", True),
    ("[ab].parquet", "c.parquet", False),
    ("[!ab].parquet", "c.parquet", True),
    ("[!ab].parquet", "a.parquet", False),
    ("a[!x]b", "a/b", False),                            # a class never matches /
    ("[0-9][0-9].parquet", "42.parquet", True),
    ("[]]x", "]x", True),                                # ] first in a class is a member
    ("a.parquet", "a_parquet", False),                   # . is literal
    ("(a)+.parquet", "(a)+.parquet", True),              # regex metacharacters are literal
    ("shard_*.parquet", "shard_00000.parquet", True),
]


@pytest.mark.parametrize("pattern,path,expected", GLOBS)
def test_glob_match(pattern, path, expected):
    assert glob_match(pattern, path) is expected


@pytest.mark.parametrize("pattern", ["", "/abs/*.parquet", "a\\b", "a**b/x", "[ab", "x\x00"])
def test_a_malformed_glob_is_a_config_error(pattern):
    with pytest.raises(ConfigError):
        glob_match(pattern, "a")


def info(size=10, sha="ab" * 32, etag=None):
    return RemoteInfo(size=size, sha256=sha, etag=etag)


FINEWEB = {p: info(100 + i, f"{i:02x}" * 32) for i, p in enumerate([
    "README.md", "data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/000_00001.parquet",
    "data/CC-MAIN-2024-18/000_00000.parquet", "sample/10BT/000_00000.parquet", "sample/10BT/000_00001.parquet",
    "sample/10BT/000_00002.parquet", "sample/10BT/000_00003.parquet"])}
NANOCHAT = {**{shard_name(i): info(i + 1) for i in range(5)}, "README.md": info(), "shard_000003.parquet": info(7)}


def paths(entries):
    return [e.path for e in entries]


SELECT = [
    # listing, files, val_files, layout, train, val
    (NANOCHAT, None, None, "nanochat", [shard_name(i) for i in range(4)], [shard_name(4)]),
    (NANOCHAT, ["shard_0000[0-4].parquet"], None, "nanochat", [shard_name(i) for i in range(4)], [shard_name(4)]),
    (FINEWEB, ["sample/10BT/*.parquet"], None, "files",
     [f"sample/10BT/000_0000{i}.parquet" for i in range(3)], ["sample/10BT/000_00003.parquet"]),
    (FINEWEB, ["sample/10BT/*.parquet"], "none", "files", [f"sample/10BT/000_0000{i}.parquet" for i in range(4)], []),
    (FINEWEB, ["data/**/*.parquet"], "sample/10BT/000_00003.parquet", "files",
     ["data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/000_00001.parquet",
      "data/CC-MAIN-2024-18/000_00000.parquet"], ["sample/10BT/000_00003.parquet"]),
    # files left out: every parquet, the val glob's files taken out of train
    (FINEWEB, None, "data/CC-MAIN-2024-18/*", "files",
     ["data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/000_00001.parquet"]
     + [f"sample/10BT/000_0000{i}.parquet" for i in range(4)], ["data/CC-MAIN-2024-18/000_00000.parquet"]),
    # a file both globs match is val, the rest train
    (FINEWEB, ["**/*.parquet"], "sample/10BT/*", "files",
     ["data/CC-MAIN-2024-10/000_00000.parquet", "data/CC-MAIN-2024-10/000_00001.parquet",
      "data/CC-MAIN-2024-18/000_00000.parquet"], [f"sample/10BT/000_0000{i}.parquet" for i in range(4)]),
    # two globs: the union, sorted, each file once
    (FINEWEB, ["sample/10BT/000_00003.parquet", "sample/**/*.parquet", "data/CC-MAIN-2024-18/*.parquet"], None,
     "files", ["data/CC-MAIN-2024-18/000_00000.parquet"] + [f"sample/10BT/000_0000{i}.parquet" for i in range(3)],
     ["sample/10BT/000_00003.parquet"]),
]


@pytest.mark.parametrize("listing,files,val_files,layout,train,val", SELECT)
def test_select(listing, files, val_files, layout, train, val):
    m = select(listing, files, val_files, revision="c0ffee", source="hf://datasets/o/n")
    assert (m.layout, paths(m.train), paths(m.val)) == (layout, train, val)
    assert m.val_ids == tuple(range(len(train), len(train) + len(val)))
    assert m.entries[0].size == listing[train[0]].size and m.entries[0].sha256 == listing[train[0]].sha256
    names = [m.cache_name(i) for i in range(len(m))]
    assert len(set(names)) == len(names)
    if layout == "nanochat":
        assert names == [shard_name(i) for i in range(len(m))]
    else:
        assert all(is_cache_name(n) for n in names)


SELECT_ERRORS = [
    # listing, files, val_files, words in the message
    (FINEWEB, ["sample/100BT/*.parquet"], None, ["matches none", "sample/10BT/"]),
    (FINEWEB, ["sample/10BT/*.parquet"], "nothing/*", ["--val-files", "matches none"]),
    (FINEWEB, ["README.md"], None, ["only 1 file", "--val-files none"]),
    ({"README.md": info()}, None, None, ["no files to read", "--files"]),
    ({shard_name(0): info(), shard_name(2): info()}, None, None, ["lacks shard_00001.parquet"]),
    ({"a/../b.parquet": info()}, None, None, ["'.' or '..'"]),
    ({"/etc/x.parquet": info()}, None, None, ["absolute"]),
    ({"a\\b.parquet": info()}, None, None, ["backslash"]),
    ({"a/b\n.parquet": info()}, None, None, ["control character"]),
    ({"a//b.parquet": info()}, None, None, ["empty step"]),
    ({"a.parquet": info(size=-1), "b.parquet": info()}, None, None, ["size"]),
]


@pytest.mark.parametrize("listing,files,val_files,words", SELECT_ERRORS)
def test_select_errors_name_the_problem(listing, files, val_files, words):
    with pytest.raises(ConfigError) as ei:
        select(listing, files, val_files, source="hf://datasets/o/n")
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_cache_names_hold_no_path_and_never_collide():
    tricky = ["a/0.parquet", "b/0.parquet", "../../etc/passwd", "x/../../y.parquet", "C:\\w.parquet",
              "sp ace/ü.parquet", "a" * 500]
    names = [cache_name(i, p) for i, p in enumerate(tricky)]
    assert len(set(names)) == len(names)
    for n in names:
        assert re.fullmatch(r"[0-9a-f-]+\.parquet", n) and is_cache_name(n), n
    assert cache_name(0, "a/0.parquet") != cache_name(0, "b/0.parquet")       # the path digest tells them apart
    assert cache_name(1_234_567, "p").startswith("1234567-")
    with pytest.raises(ConfigError):
        cache_name(-1, "p")


def manifest(**changes):
    train = [ManifestEntry("a/0.parquet", 10, "aa" * 32), ManifestEntry("a/1.parquet", 11, None, '"e1"')]
    val = [ManifestEntry("b/0.parquet", 12, "bb" * 32)]
    base = dict(train=tuple(train), val=tuple(val), revision="c0ffee", source="s", layout="files")
    return Manifest(**{**base, **changes})


DIGEST_CHANGES = [
    dict(revision="c0ffef"),
    dict(layout="nanochat"),
    dict(train=(ManifestEntry("a/0.parquet", 10, "aa" * 32),)),
    dict(train=(ManifestEntry("a/0.parquet", 10, "ab" * 32), ManifestEntry("a/1.parquet", 11, None, '"e1"'))),
    dict(train=(ManifestEntry("a/0.parquet", 13, "aa" * 32), ManifestEntry("a/1.parquet", 11, None, '"e1"'))),
    dict(train=(ManifestEntry("a/0.parquet", 10, "aa" * 32), ManifestEntry("a/1.parquet", 11, None, '"e2"'))),
    dict(train=(ManifestEntry("a/1.parquet", 11, None, '"e1"'), ManifestEntry("a/0.parquet", 10, "aa" * 32))),
    dict(train=(ManifestEntry("a/0.parquet", 10, "aa" * 32),),
         val=(ManifestEntry("a/1.parquet", 11, None, '"e1"'), ManifestEntry("b/0.parquet", 12, "bb" * 32))),
    dict(val=()),
]


@pytest.mark.parametrize("change", DIGEST_CHANGES, ids=[str(i) for i in range(len(DIGEST_CHANGES))])
def test_the_digest_changes_with_any_entry(change):
    assert manifest().digest() == manifest().digest() and len(manifest().digest()) == 32
    assert manifest(**change).digest() != manifest().digest()
    assert manifest(source="another name").digest() == manifest().digest()    # the name is no content


def test_entries_from_listing_sorts_and_refuses_a_path_twice():
    e = entries_from_listing({"b.parquet": info(1), "a.parquet": info(2)})
    assert paths(e) == ["a.parquet", "b.parquet"]
    with pytest.raises(ConfigError, match="twice"):
        entries_from_listing([ManifestEntry("a", 1), ManifestEntry("a", 2)])


def test_parse_manifest_file():
    text = "# FineWeb sample\n\n  sample/10BT/000_00001.parquet  \r\nsample/10BT/000_00000.parquet\n" \
           "https://host.example/d/x.parquet?sig=1\nhf://datasets/o/n/data/y.parquet\n"
    e = parse_manifest_file(text, base="https://mirror.example/base/")
    assert paths(e) == ["sample/10BT/000_00001.parquet", "sample/10BT/000_00000.parquet",   # the file's order
                        "https://host.example/d/x.parquet", "hf://datasets/o/n/data/y.parquet"]
    assert e[0].url == "https://mirror.example/base/sample/10BT/000_00001.parquet"
    assert e[2].url == "https://host.example/d/x.parquet?sig=1" and e[3].url == "hf://datasets/o/n/data/y.parquet"
    assert parse_manifest_file("a.parquet\n")[0].url is None


MANIFEST_ERRORS = [
    ("a.parquet\n../b.parquet\n", 2, "'..'"),
    ("a.parquet\n\n/etc/passwd\n", 3, "absolute"),
    ("dir\\b.parquet\n", 1, "backslash"),
    ("a\x07b.parquet\n", 1, "control character"),
    ("a.parquet\nx/./a.parquet\n", 2, "'.'"),
    ("a.parquet\n# c\na.parquet\n", 3, "named again (first on line 1)"),
    ("https://h.example/a/../b.parquet\n", 1, "'..'"),
    ("https://h.example/a/%2e%2e/b.parquet\n", 1, "'..'"),
    ("https://h.example/dir/\n", 1, "folder"),
    ("s3:///key.parquet\n", 1, "no host"),
]


@pytest.mark.parametrize("text,line,why", MANIFEST_ERRORS)
def test_manifest_file_errors_name_the_line(text, line, why):
    with pytest.raises(ConfigError) as ei:
        parse_manifest_file(text, where="runs/m.txt")
    msg = str(ei.value)
    assert f"runs/m.txt, line {line}" in msg and why in msg, msg


def test_an_empty_manifest_file_is_an_error():
    with pytest.raises(ConfigError, match="names no files"):
        parse_manifest_file("# nothing\n\n")


@pytest.mark.parametrize("path,ok", [("a/b.parquet", True), ("", False), ("a/", False), ("./a", False),
                                     ("a/..", False), ("\\a", False), ("/a", False), ("a\tb", False)])
def test_path_problem(path, ok):
    assert (path_problem(path) is None) is ok


def test_from_entries_keeps_the_file_order_and_splits_val():
    from shardstream.manifest import ManifestEntry, from_entries
    entries = [ManifestEntry(p) for p in ("z/1.parquet", "a/2.parquet", "val/3.parquet")]
    m = from_entries(entries)
    assert [e.path for e in m.train] == ["z/1.parquet", "a/2.parquet"] and [e.path for e in m.val] == ["val/3.parquet"]
    m = from_entries(entries, "val/*.parquet")
    assert [e.path for e in m.train] == ["z/1.parquet", "a/2.parquet"] and m.val_ids == (2,)
    assert from_entries(entries, "none").val == () and len(from_entries(entries, "none")) == 3
    with pytest.raises(ConfigError, match="--val-files 'v/\\*' matches none"):
        from_entries(entries, "v/*")
    with pytest.raises(ConfigError, match="only 1 file"):
        from_entries(entries[:1])
