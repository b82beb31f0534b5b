"""``unlearn-tui cache``: list and prune the on-disk caches (tui/cache_cli.py), on a fake cache in tmp_path."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from unlearn_tui.backends import finetune_first
from unlearn_tui.tui import cache_cli, cli

DAY = 86400.0
BASE = "0123456789abcdef"                    # a base fingerprint (16 hex)
OLD_KEY, NEW_KEY, BAD_KEY = "a" * 24, "b" * 24, "c" * 24


def age(path: Path, days: float) -> None:
    """Set the modification time of ``path`` (and everything under a folder) to ``days`` ago."""
    t = time.time() - days * DAY
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path, topdown=False):
            for n in files + dirs:
                os.utime(os.path.join(root, n), (t, t), follow_symlinks=False)
    os.utime(path, (t, t), follow_symlinks=False)


def write(path: Path, data: bytes | str, days: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if days is not None:
        age(path, days)
    return path


def finetune_entry(key: str, weights: int, meta: dict | str, days: float) -> tuple[Path, Path]:
    w, m = finetune_first.cache_files(BASE, key)
    write(w, b"\0" * weights, days)
    write(m, meta if isinstance(meta, str) else json.dumps(meta, indent=1), days)
    return w, m


def meta(key: str, items: int, epochs: int, rouge1: float, data: str = "forget+retain", tuning: str = "full") -> dict:
    return {"version": 1, "key": key, "model": "smollm2-135m-instruct", "base_fingerprint": BASE,
            "settings": {"tuning": tuning, "epochs": 20}, "data": data, "items": items, "rouge1": rouge1,
            "reached": True, "epochs": epochs, "steps": 30, "seconds": 12.5, "history": [], "created": 1.0}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A fake cache: two fine-tunes (10 and 2 days old), stats, corpora (a stale leftover temporary file and a
    symlink pointing outside), known scores (one fresh), a model folder, an offload folder, a symlinked kind
    folder, a fine-tune temporary file being written; and the files outside the cache the links point to."""
    root = tmp_path / "cache"
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(root))
    outside = tmp_path / "outside"
    secret = write(outside / "secret.json", "{}")
    big = write(outside / "big.bin", b"x" * 777)
    write(outside / "tpl" / "fp.json", "[]")
    t = {"root": root, "outside": outside, "secret": secret, "big": big}
    t["old"] = finetune_entry(OLD_KEY, 1500, meta(OLD_KEY, 40, 3, 0.95), 10)
    t["new"] = finetune_entry(NEW_KEY, 2500, meta(NEW_KEY, 20, 5, 1.0, "retain", "lora"), 2)
    folder = root / "finetuned" / BASE
    t["temp"] = write(folder / f".{NEW_KEY}.safetensors.unlearn-tui-{os.getpid()}-abcd1234.tmp", b"\0" * 300, 3)
    stats = root / "stats" / "fedcba9876543210"
    write(stats / "self-v1-b100000-L3.safetensors", b"s" * 4000)
    os.symlink(big, stats / "link.bin")
    age(stats, 20)
    t["stats"] = stats
    write(root / "corpora" / "self-fedcba9876543210-s128-v1.json", "[1, 2]", 30)
    t["stale"] = write(root / "corpora" / ".self-x.json.q1w2e3r4.tmp", "half", 1)     # fileio's old naming
    os.symlink(secret, root / "corpora" / "link.json")
    write(root / "known" / "known-111.json", '{"a": 1}', 4)
    t["fresh"] = write(root / "known" / "known-222.json", '{"b": 2}')                 # modified just now
    model = root / "models" / "smollm2-0011223344556677"
    write(model / "model.safetensors", b"m" * 5000)
    write(model / "unlearn-tui-cache.json", "{}")
    age(model, 6)
    write(root / "offload" / "run-abc" / "w.dat", b"o" * 100)
    age(root / "offload" / "run-abc", 8)                                           # the folder's own date counts too
    os.symlink(outside / "tpl", root / "templates")
    write(root / "tui" / "sampling-rates.json", "{}", 1)
    return t


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["cache", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(path: Path) -> dict[str, tuple[int, float]]:
    """(size, mtime) of every file and symlink under ``path`` (folders left out: removing changes their dates)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime)
    return out


def test_cache_dir_is_the_environment_variable(tree):
    from unlearn_tui.backends.paths import cache_dir

    assert cache_dir() == tree["root"]
    assert finetune_first.cache_root() == tree["root"] / "finetuned"


def test_list_counts_sizes_and_fine_tunes(tree, capsys):
    bad_w, bad_m = finetune_entry(BAD_KEY, 700, '{"items": 3, "epochs":', 5)
    rc, out, err = run(capsys)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"unlearn-tui cache: {tree['root']}"
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and not ln.startswith(" ")}
    old_w, old_m = tree["old"]
    new_w, new_m = tree["new"]
    ft_bytes = sum(p.stat().st_size for p in (old_w, old_m, new_w, new_m, bad_w, bad_m, tree["temp"]))
    assert rows["finetuned"][1] == "3" and " ".join(rows["finetuned"][2:4]) == cache_cli.human(ft_bytes)
    assert "1 temporary" in " ".join(rows["finetuned"])
    assert rows["stats"][1:4] == ["1", "4.0", "kB"]                 # one model's folder; the symlink counts nothing
    assert rows["corpora"][1] == "2" and "1 temporary" in " ".join(rows["corpora"])
    assert rows["known"][1] == "2" and rows["models"][1] == "1" and rows["offload"][1:4] == ["1", "100", "B"]
    assert "outside the cache" in " ".join(rows["templates"]) and rows["templates"][1] == "0"
    assert rows["other"][1] == "1"
    assert str(tree["root"] / "finetuned") in " ".join(rows["finetuned"])
    ft = [ln for ln in lines if ln.startswith(f"  {BASE[:12]}")]
    assert len(ft) == 3                                             # the temporary file is no fine-tune
    assert ft[0].split()[1] == NEW_KEY[:12]                         # newest first
    assert "items 20 · epochs 5 · ROUGE-1 1.000 · data retain · tuning lora" in ft[0]
    assert ft[1].split()[1] == BAD_KEY[:12] and ft[1].endswith("meta unreadable")
    assert "items 40 · epochs 3 · ROUGE-1 0.950 · data forget+retain · tuning full" in ft[2]
    assert cache_cli.human(1500 + old_m.stat().st_size) in ft[2]
    assert time.strftime("%Y-%m-%d", time.localtime(old_w.stat().st_mtime)) in ft[2]


def test_list_json(tree, capsys):
    finetune_entry(BAD_KEY, 700, "[1, 2]", 5)                       # JSON, but not a meta note
    rc, out, _ = run(capsys, "--json")
    assert rc == 0
    data = json.loads(out)
    assert run(capsys, "list", "--json")[1] == out
    assert data["cache_dir"] == str(tree["root"]) and data["exists"] is True
    kinds = {k["kind"]: k for k in data["kinds"]}
    assert list(kinds) == list(cache_cli.KINDS)
    assert {"kind", "path", "exists", "entries", "temporary", "bytes", "size", "note", "items"} <= set(kinds["stats"])
    assert kinds["finetuned"]["entries"] == 3 and kinds["finetuned"]["temporary"] == 1
    assert kinds["stats"]["bytes"] == 4000 and kinds["stats"]["size"] == "4.0 kB"
    assert kinds["templates"]["note"] and "outside" in kinds["templates"]["note"]
    assert data["bytes"] == sum(k["bytes"] for k in data["kinds"]) + data["other"]["bytes"]
    ft = data["finetuned"]
    assert [e["key"] for e in ft] == [NEW_KEY, BAD_KEY, OLD_KEY]
    new = ft[0]
    assert new["base"] == BASE and new["files"] == [f"{NEW_KEY}.safetensors", f"{NEW_KEY}.json"]
    assert new["meta"]["items"] == 20 and new["meta"]["epochs"] == 5 and new["meta"]["rouge1"] == 1.0
    assert new["meta"]["data"] == "retain" and new["meta"]["tuning"] == "lora" and new["meta_error"] is None
    assert new["state"] == "ok" and new["bytes"] > 2500 and new["modified"]
    assert ft[1]["meta"] is None and ft[1]["meta_error"] == "meta unreadable"
    items = {e["name"]: e for e in kinds["corpora"]["items"]}
    assert items["corpora/link.json"]["state"] == "symlink"
    assert items["corpora/.self-x.json.q1w2e3r4.tmp"]["state"] == "leftover temporary"


def test_missing_cache_dir_is_empty_not_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "nope"))
    rc, out, err = run(capsys)
    assert rc == 0 and "does not exist" in out and err == ""
    rc, out, err = run(capsys, "prune", "all")
    assert rc == 0 and "nothing to remove" in out and err == ""
    data = json.loads(run(capsys, "--json")[1])
    assert data["exists"] is False and all(k["entries"] == 0 for k in data["kinds"])
    assert not (tmp_path / "nope").exists()


def test_prune_keep_last_removes_exactly_the_older_fine_tune(tree, capsys):
    before = files_under(tree["root"])
    rc, out, err = run(capsys, "prune", "finetuned", "--keep-last", "1")
    assert rc == 0 and err == ""
    after = files_under(tree["root"])
    gone = set(before) - set(after)
    old_w, old_m = tree["old"]
    assert gone == {str(p.relative_to(tree["root"])) for p in (old_w, old_m)}
    assert all(after[k] == before[k] for k in after)
    assert f"removed finetuned/{BASE}/{OLD_KEY} ({OLD_KEY}.safetensors + {OLD_KEY}.json)" in out
    freed = before[str(old_w.relative_to(tree["root"]))][0] + before[str(old_m.relative_to(tree["root"]))][0]
    assert f"freed {cache_cli.human(freed)}" in out and "kept 1" in out
    assert f"skipped finetuned/{BASE}/{tree['temp'].name}: a temporary file" in out


def test_keep_last_counts_per_kind_and_ignores_temporary_files(tree, capsys):
    finetune_entry(BAD_KEY, 700, "not json", 5)
    rc, out, _ = run(capsys, "prune", "finetuned", "corpora", "--keep-last", "2")
    assert rc == 0
    assert not any(p.exists() for p in tree["old"]) and all(p.exists() for p in tree["new"])
    assert finetune_first.cache_files(BASE, BAD_KEY)[0].exists()
    assert tree["temp"].exists()
    # corpora: one real entry (the symlink never counts), so it is kept; the stale leftover goes
    assert (tree["root"] / "corpora" / "self-fedcba9876543210-s128-v1.json").exists()
    assert not tree["stale"].exists() and "leftover temporary file" in out


def test_prune_older_than_goes_by_modification_time(tree, capsys):
    rc, out, _ = run(capsys, "prune", "finetuned", "stats", "models", "--older-than", "7")
    assert rc == 0
    assert not any(p.exists() for p in tree["old"]) and all(p.exists() for p in tree["new"])
    assert not tree["stats"].exists()                      # 20 days: the folder as a whole
    assert tree["big"].read_bytes() == b"x" * 777          # ...whose symlink's target is outside: untouched
    assert (tree["root"] / "models" / "smollm2-0011223344556677").is_dir()     # 6 days: kept
    assert "removed stats/fedcba9876543210" in out and "kept 2" in out
    rc, out, _ = run(capsys, "prune", "models", "--older-than", "5.5")
    assert rc == 0 and not (tree["root"] / "models" / "smollm2-0011223344556677").exists()


def test_dry_run_removes_nothing(tree, capsys):
    before = files_under(tree["root"])
    rc, out, _ = run(capsys, "prune", "all", "--dry-run")
    assert rc == 0 and files_under(tree["root"]) == before
    assert f"would remove finetuned/{BASE}/{OLD_KEY}" in out and "would remove stats/fedcba9876543210" in out
    assert "would free" in out and "dry run: nothing was removed" in out and "\nremoved" not in out


def test_prune_all_never_leaves_the_cache(tree, capsys):
    outside_before = files_under(tree["outside"])
    rc, out, _ = run(capsys, "prune", "all")
    assert rc == 0
    assert files_under(tree["outside"]) == outside_before
    assert tree["secret"].read_text() == "{}" and tree["big"].read_bytes() == b"x" * 777
    root = tree["root"]
    assert (root / "corpora" / "link.json").is_symlink()                       # the link itself is left alone
    assert "skipped corpora/link.json: a symlink" in out
    assert (root / "templates").is_symlink() and "skipped templates/: a symlink to" in out
    assert tree["temp"].exists() and tree["fresh"].exists()                     # being written; just modified
    assert "skipped known/known-222.json: modified" in out
    assert (root / "tui" / "sampling-rates.json").exists()                     # not a kind: never pruned
    left = {p for p in files_under(root) if "/" in p}
    assert left == {f"finetuned/{BASE}/{tree['temp'].name}", "corpora/link.json", "known/known-222.json",
                    "tui/sampling-rates.json"}
    assert not (root / "offload" / "run-abc").exists() and not (root / "models" / "smollm2-0011223344556677").exists()


def test_entries_in_use_or_resolving_outside_are_left_alone(tree):
    root = tree["root"]
    _root, kinds, _other = cache_cli.scan()
    stats = [k for k in kinds if k.kind == "stats"]
    p = cache_cli.plan(stats, root, None, None, open_paths={os.path.realpath(tree["stats"]) + "/x.safetensors": 4242})
    assert p.remove == [] and "in use by process 4242" in p.skipped[0][1]
    assert cache_cli._inside(root.resolve(), tree["stats"]) and not cache_cli._inside(root.resolve(), tree["secret"])
    assert not cache_cli._inside(root.resolve(), root / "templates" / "fp.json")   # through the symlinked folder


@pytest.mark.parametrize("argv, needle", [
    (["prune", "stat"], "unknown cache kind 'stat'"),
    (["prune"], "required: KIND"),
    (["prune", "stats", "--keep-last", "-1"], "expected a whole number >= 0"),
    (["prune", "stats", "--keep-last", "two"], "expected a whole number >= 0"),
    (["prune", "stats", "--keep-last", "1.5"], "expected a whole number >= 0"),
    (["prune", "stats", "--older-than", "-3"], "expected a number of days >= 0"),
    (["prune", "stats", "--older-than", "soon"], "expected a number of days >= 0"),
    (["prune", "stats", "--older-than", "nan"], "expected a number of days >= 0"),
    (["purge"], "invalid choice: 'purge'"),
    (["list", "--everything"], "unrecognized arguments: --everything"),
])
def test_bad_input_is_one_line_and_exit_2(tree, capsys, argv, needle):
    before = files_under(tree["root"])
    with pytest.raises(SystemExit) as e:
        cli.main(["cache", *argv])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("unlearn-tui: error: ") and needle in lines[0]
    assert "--help)" in lines[0]
    assert files_under(tree["root"]) == before


def test_help_names_the_kinds_and_the_top_level_help_names_cache(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cache", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "prune" in out and all(k in out for k in cache_cli.KINDS)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "unlearn-tui cache" in capsys.readouterr().out
    assert cli.misspelt_subcommand("cahce") == "cache"


def test_an_unfinished_fine_tune_is_listed_as_one_that_resumes(tmp_path, monkeypatch, capsys):
    """The partial files an interrupted fine-tune keeps (finetune_first "Resume") are one entry, said to resume."""
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))
    tensors, note = finetune_first.partial_files(BASE, "k" * 24)
    tensors.parent.mkdir(parents=True)
    tensors.write_bytes(b"x" * 100)
    note.write_text(json.dumps({"items": 400, "epochs": 4, "rouge1": 0.28, "data": "all",
                                "settings": {"tuning": "full"}, "partial": True}))
    rc, out, _ = run(capsys)
    assert rc == 0
    line = next(x for x in out.splitlines() if "resumes after" in x)
    assert "items 400 · epochs 4 · ROUGE-1 0.280 · data all · tuning full · unfinished: resumes after this epoch" \
        in line
    ft = json.loads(run(capsys, "--json")[1])["finetuned"]
    assert [e["key"] for e in ft] == ["k" * 24 + ".partial"] and ft[0]["meta"]["partial"] is True
    assert sorted(ft[0]["files"]) == sorted([tensors.name, note.name])
