"""backends.fileio: the one set of atomic-write rules, for files, safetensors files and folders.

The text/bytes writer's own cases (fsync order, failures at each step, a
planted symlink, stale temporary files) are in tests/test_autosave.py; these
cover what the other writers add and that all of them share one naming rule.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from unlearn_tui.backends import fileio


def _entries(folder):
    return sorted(os.listdir(folder))


def _dead_pid() -> int:
    """A pid that no longer runs (a child that has exited)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_sessions_and_the_engine_share_one_writer():
    from unlearn_tui import sessions
    import unlearn_tui.sessions.writer as writer

    assert sessions.atomic_write is fileio.atomic_write is writer.atomic_write
    assert writer.clean_stale_temps is fileio.clean_stale_temps
    assert (writer.TEMP_MARK, writer.STALE_TEMP_SECONDS) == (fileio.TEMP_MARK, fileio.STALE_TEMP_SECONDS)


def test_save_safetensors_round_trips_and_leaves_no_temp(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    p = tmp_path / "stats.safetensors"
    assert fileio.save_safetensors(p, {"mom2": torch.eye(3)}, {"version": "1"}) == p
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"version": "1"}
        assert torch.equal(f.get_tensor("mom2"), torch.eye(3))
    assert _entries(tmp_path) == ["stats.safetensors"]
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644          # a new file: 0644, not mkstemp's 0600
    os.chmod(p, 0o600)
    fileio.save_safetensors(p, {"mom2": torch.zeros(2)})
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600          # a replaced file keeps its bits


def test_save_safetensors_failure_keeps_the_original(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")

    p = tmp_path / "stats.safetensors"
    fileio.save_safetensors(p, {"a": torch.ones(2)})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        fileio.save_safetensors(p, {"a": torch.zeros(5)})
    assert p.read_bytes() == before
    assert _entries(tmp_path) == ["stats.safetensors"]


def test_atomic_folder_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with fileio.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".cache.{fileio.TEMP_MARK}-{os.getpid()}-")
        (tmp / "new.txt").write_text("new")
        assert _entries(target) == ["old.txt"]                 # nothing visible until the block ends
    assert _entries(target) == ["new.txt"]
    assert _entries(tmp_path) == ["cache"]


def test_atomic_folder_error_keeps_the_old_folder_and_removes_the_temp(tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with fileio.atomic_folder(target) as tmp:
            (tmp / "partial.bin").write_bytes(b"\0" * 10)
            raise RuntimeError("half-way")
    assert _entries(target) == ["old.txt"]
    assert _entries(tmp_path) == ["cache"]


def test_atomic_folder_fsyncs_the_files_it_renames(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat.S_ISDIR(st.st_mode) else f"file:{st.st_size}")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    with fileio.atomic_folder(tmp_path / "cache") as tmp:
        (tmp / "weights").write_bytes(b"x" * 7)
    assert "file:7" in synced
    if os.name == "posix":
        assert synced[-1] == "dir"                              # the parent, after the rename


def test_stale_temp_folders_are_removed_only_for_folder_writes(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".cache.{fileio.TEMP_MARK}-{dead}-abcdefgh.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / f".other.{fileio.TEMP_MARK}-{dead}-abcdefgh.tmp"   # another target's: not ours to judge
    other.mkdir()
    live = tmp_path / f".cache.{fileio.TEMP_MARK}-{os.getpid()}-abcdefgh.tmp"  # a running writer's
    live.mkdir()

    assert fileio.clean_stale_temps(tmp_path, "cache") == []       # file writers never touch folders
    with fileio.atomic_folder(tmp_path / "cache") as tmp:
        (tmp / "ok").write_text("1")
    assert not stale.exists()
    assert other.exists() and live.exists()
    # a running writer's folder goes once it is older than the age limit
    old = time.time() - fileio.STALE_TEMP_SECONDS - 10
    os.utime(live, (old, old))
    assert fileio.clean_stale_temps(tmp_path, "cache", folders=True) == [live]


def test_a_symlinked_temp_name_is_never_followed_by_the_cleanup(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    link = tmp_path / f".cache.{fileio.TEMP_MARK}-{_dead_pid()}-abcdefgh.tmp"
    link.symlink_to(victim, target_is_directory=True)
    fileio.clean_stale_temps(tmp_path, "cache", folders=True)
    assert link.is_symlink() and (victim / "keep.txt").read_text() == "keep"


def test_probe_writable_leaves_nothing_and_fails_in_a_read_only_folder(tmp_path):
    fileio.probe_writable(tmp_path / "results.json")
    assert _entries(tmp_path) == []
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):   # root ignores permission bits
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(OSError):
            fileio.probe_writable(ro / "results.json")
    finally:
        os.chmod(ro, 0o700)


def test_the_caches_of_the_engine_go_through_fileio(tmp_path, monkeypatch):
    """stats and templates write their JSON caches with atomic_write (no private writer left)."""
    from unlearn_tui.backends import stats
    from unlearn_tui.backends.editing import templates

    calls: list = []
    monkeypatch.setattr(stats, "atomic_write", lambda p, text: calls.append(("stats", p, text)))
    stats._write_json_atomic(tmp_path / "sub" / "c.json", {"a": 1})
    assert calls == [("stats", tmp_path / "sub" / "c.json", '{"a": 1}')]
    assert templates.atomic_write is fileio.atomic_write


def test_temp_names_and_their_writers():
    from unlearn_tui.backends import fileio

    mine = f".stats.json.{fileio.TEMP_MARK}-{os.getpid()}-abcd1234.tmp"
    assert fileio.is_temp_name(mine) and fileio.temp_writer_running(mine)
    gone = f".stats.json.{fileio.TEMP_MARK}-999999999-abcd1234.tmp"     # no such process
    assert fileio.is_temp_name(gone) and not fileio.temp_writer_running(gone)
    old = ".stats.json.abcd1234.tmp"                                     # the old naming carries no pid
    assert fileio.is_temp_name(old) and not fileio.temp_writer_running(old)
    assert not fileio.is_temp_name("stats.json") and not fileio.is_temp_name(".stats.json.tmp")
