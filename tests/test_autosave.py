"""Issue 12: what a crash, a kill or a bad file leaves behind must never break the next start.

* a data load that fails leaves the app consistent, and the Targets pane never
  looks up an item that is not loaded (the KeyError race after a failed load);
* the autosave is one file replaced atomically; a corrupt, unreadable or
  invalid one (or a file of the old two-file autosave, whole or half) is set
  aside with a one-line warning and the app starts without it;
* ``sessions.writer.atomic_write`` (the one atomic writer): mkstemp in the
  folder (O_EXCL, never through a symlink), fsync, replace, fsync of the folder,
  nothing left on error; stale temporary files of killed saves are removed by
  the next save or load in that folder, a live writer's are kept;
* a session with ``[model] trust_remote_code = true`` loads its model only when
  the app was started with ``trust_remote_code=True`` (``--trust-remote-code``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from unlearn_tui import sessions
from unlearn_tui.sessions import paths as session_paths
from unlearn_tui.sessions import writer

ROOT = Path(__file__).resolve().parents[1]


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _touch(path: Path, text: str = "partial", age: float = 0.0) -> Path:
    path.write_text(text)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


# ===================================================================== the atomic writer
def test_atomic_write_text_bytes_mode_and_symlinked_target(tmp_path):
    p = tmp_path / "f.txt"
    assert writer.atomic_write(p, "héllo\r\nworld\n") == p
    assert p.read_bytes() == "héllo\r\nworld\n".encode()          # line endings as given
    assert (os.stat(p).st_mode & 0o777) == 0o644                    # a new file: 0644, not mkstemp's 0600
    os.chmod(p, 0o600)
    writer.atomic_write(p, b"\x00\xffbytes")
    assert p.read_bytes() == b"\x00\xffbytes" and (os.stat(p).st_mode & 0o777) == 0o600
    link = tmp_path / "link.txt"
    link.symlink_to(p)
    writer.atomic_write(link, "through the link")
    assert link.is_symlink() and p.read_text() == "through the link"
    assert _temps(tmp_path) == []


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    import stat as stat_mod

    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append("dir" if stat_mod.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    writer.atomic_write(tmp_path / "f.txt", "x")
    assert synced == (["file", "dir"] if os.name == "posix" else ["file"])


@pytest.mark.parametrize("fail", ["write", "fsync", "replace"])
def test_atomic_write_error_keeps_original_and_leaves_no_temp(tmp_path, monkeypatch, fail):
    p = tmp_path / "f.txt"
    p.write_text("original")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        if fail == "write":
            m.setattr(os, "fdopen", lambda fd, *a, **k: _FailingFile(fd))
        elif fail == "fsync":
            m.setattr(os, "fsync", boom)
        else:
            m.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="No space left"):
            writer.atomic_write(p, "new text")
    assert p.read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


class _FailingFile:
    """A file object whose write fails (the disk filled up)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_atomic_write_never_opens_a_planted_symlink(tmp_path, monkeypatch):
    """The temporary name is created with O_EXCL: a symlink planted at that name is skipped, not followed."""
    if not hasattr(tempfile, "_get_candidate_names"):
        pytest.skip("this Python's tempfile draws its names differently")
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    planted = tmp_path / f".s.toml.{writer.TEMP_MARK}-{os.getpid()}-aaaaaaaa.tmp"
    planted.symlink_to(victim)
    names = iter(["aaaaaaaa", "bbbbbbbb", "cccccccc"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    writer.atomic_write(tmp_path / "s.toml", "the session")
    assert victim.read_text() == "do not touch"
    assert (tmp_path / "s.toml").read_text() == "the session"
    assert planted.is_symlink()                       # not ours to remove either


# ===================================================================== stale temporary files
def test_stale_age_is_the_documented_one():
    """The names and ages planted below are the writer's (module doc of sessions/writer.py)."""
    assert writer.TEMP_MARK == "unlearn-tui" and writer.STALE_TEMP_SECONDS == 3600.0


def _plant(folder: Path) -> tuple[set[str], set[str]]:
    """Temporary files a killed save could leave, and some that must stay: (stale names, kept names)."""
    mark, me, parent, dead = "unlearn-tui", os.getpid(), os.getppid(), _dead_pid()   # the documented names
    hour = 3600.0                                                                   # STALE_TEMP_SECONDS
    stale = {
        _touch(folder / f".s.toml.{mark}-{dead}-abcdefgh.tmp").name,             # its writer is gone
        _touch(folder / f".other.toml.{mark}-{dead}-abc_0123.tmp").name,         # any file's, in this folder
        _touch(folder / f".s.toml.{mark}-{me}-zzzzzzzz.tmp", age=2 * hour).name,  # pid alive but too old
        _touch(folder / ".s.toml.k3j4h5g6.tmp", age=2 * hour).name,              # an older version's name
    }
    victim = _touch(folder / "victim.txt", "do not touch")
    link = folder / f".s.toml.{mark}-{dead}-linklink.tmp"
    link.symlink_to(victim)
    kept = {
        _touch(folder / f".s.toml.{mark}-{me}-livelive.tmp").name,                # a live writer's, fresh
        _touch(folder / f".s.toml.{mark}-{parent}-parent00.tmp").name,            # another live process's
        _touch(folder / ".s.toml.recent00.tmp").name,                            # old naming, but recent
        _touch(folder / ".notes.k3j4h5g6.tmp", age=2 * hour).name,               # old naming, another file's
        _touch(folder / ".s.toml.backup.tmp", age=2 * hour).name,                # not our pattern
        "victim.txt", link.name,                                                 # a symlink is never ours
    }
    return stale, kept


MINIMAL = 'version = 1\n[model]\nname = "tiny:llama"\n[data]\npath = "builtin:world-facts"\n'


def test_save_removes_stale_temp_files_and_keeps_a_live_writers(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(MINIMAL)
    s = sessions.loads(MINIMAL, p)
    stale, kept = _plant(tmp_path)
    s.targets.merge_factor = 2
    sessions.save(s)
    names = set(os.listdir(tmp_path))
    assert not names & stale
    assert kept | {"s.toml"} == names
    assert (tmp_path / "victim.txt").read_text() == "do not touch"
    assert sessions.load(p).targets.merge_factor == 2


def test_load_removes_stale_temp_files(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(MINIMAL)
    stale, kept = _plant(tmp_path)
    sessions.load(p)
    assert set(os.listdir(tmp_path)) == kept | {"s.toml"}


def test_atomic_write_cleans_the_folder_it_writes_in(tmp_path):
    stale, kept = _plant(tmp_path)
    writer.atomic_write(tmp_path / "autosave.session.json", "{}")
    # the old naming names no pid: only the file being written judges its own old temporary files
    assert set(os.listdir(tmp_path)) == kept | {"autosave.session.json", ".s.toml.k3j4h5g6.tmp"}


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_killed_saves_do_not_pile_up_temp_files(tmp_path):
    """Kill a save between creating its temporary file and the rename, again and again."""
    p = tmp_path / "s.toml"
    p.write_text(MINIMAL)
    child = textwrap.dedent("""
        import os, sys, time
        from unlearn_tui import sessions
        s = sessions.load(sys.argv[1])
        s.targets.merge_factor = int(sys.argv[2])
        def hang(fd):              # the temporary file exists and is written: stop here until killed
            print("ready", flush=True)
            time.sleep(60)
        os.fsync = hang
        sessions.save(s)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for i in range(4):
        proc = subprocess.Popen([sys.executable, "-c", child, str(p), str(i + 2)], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env=env)
        try:
            assert proc.stdout.readline().strip() == "ready"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        assert len(_temps(tmp_path)) == 1          # this kill's; the previous one's went with this save
        assert p.read_text() == MINIMAL             # a killed save never touches the session
    s = sessions.load(p)                             # the next load cleans up
    assert _temps(tmp_path) == []
    s.targets.merge_factor = 9
    sessions.save(s)
    assert _temps(tmp_path) == [] and sessions.load(p).targets.merge_factor == 9


# ===================================================================== autosave
pytest.importorskip("textual")

from test_tui_flow import ITEMS, settings, wait_for, wait_idle, write_session  # noqa: E402


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    return p


def _messages(app) -> list[tuple[str, str]]:
    return [(n.severity, n.message) for n in app._notifications]


def _aside(folder: Path, tag: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if f".{tag}-" in p.name)


def _autosave_of(session_file: Path, merge_factor: int) -> str:
    from unlearn_tui.tui.files import autosave_text

    s = sessions.load(session_file)
    s.targets.merge_factor = merge_factor
    return autosave_text(s)


@pytest.mark.anyio
async def test_autosave_is_one_file_and_is_restored(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file)
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        app.workspace.set_merge_factor(4)
        app.file_actions.autosave()
    folder = session_paths.autosave_dir()
    mine = session_paths.session_autosave_path(session, app.instance)
    assert sorted(os.listdir(folder)) == [mine.name]   # one file per session; no pair, no temp file
    assert sorted(os.listdir(session_paths.data_dir())) == [session_paths.AUTOSAVE_DIR]
    obj = json.loads(mine.read_text(encoding="utf-8"))
    assert obj["format"] == 1 and obj["path"] == str(session.resolve()) and "merge_factor = 4" in obj["session"]
    assert obj["pid"] == os.getpid() and obj["instance"] == app.instance
    app2 = create_app(settings=settings())           # offered (asked on mount), not restored unasked
    offer = app2.restore_offer
    assert offer.session.targets.merge_factor == 4 and offer.session.path == session.resolve()
    assert not app2._restored and app2.workspace.session.targets.merge_factor == 1


@pytest.mark.anyio
async def test_interrupted_autosave_never_mixes_two_states(tmp_path, data_file, llama_handle, monkeypatch):
    """A crash part-way through an autosave leaves one whole state: the old one or the new one."""
    from unlearn_tui.tui.app import create_app

    first = write_session(tmp_path, data_file)
    second = tmp_path / "elsewhere" / "second.toml"
    second.parent.mkdir()

    def restored_state():
        """What a restart would offer: the newest valid autosave (the running app's own, here)."""
        from unlearn_tui.tui import files

        found = []
        for p in session_paths.autosave_dir().iterdir():
            try:
                sess, obj = files._read_autosave(p)
            except ValueError:
                continue
            found.append((obj["saved_at"], sess))
        s = max(found, key=lambda f: f[0])[1]
        return s.targets.merge_factor, s.path

    def autosave_dying_after(n_renames: int) -> None:
        """An autosave during which the process dies after ``n_renames`` renames."""
        calls = []
        real = os.replace

        def replace(src, dst):
            calls.append(dst)
            if len(calls) > n_renames:
                raise KeyboardInterrupt
            real(src, dst)

        with monkeypatch.context() as m:
            m.setattr(os, "replace", replace)
            try:
                app.file_actions.autosave()
            except KeyboardInterrupt:
                pass

    app = create_app(first, handle=llama_handle, settings=settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        app.workspace.set_merge_factor(3)
        app.file_actions.autosave()                                   # state A: first.toml, merge 3
        assert restored_state() == (3, first.resolve())
        app.workspace.set_merge_factor(5)
        autosave_dying_after(0)                          # before anything is renamed
        assert restored_state() == (3, first.resolve())  # the previous autosave, whole
        assert app.file_actions.save_to(str(second))
        app.workspace.set_merge_factor(6)                          # state B: second.toml, merge 6
        autosave_dying_after(1)                          # after its first rename
        assert restored_state() == (6, second.resolve())  # never B's session with A's file name
    assert _temps(session_paths.data_dir()) == []


BAD_AUTOSAVES = {
    "non-utf8": b"\xff\xfe\x00\x9c not text at all \x80",
    "invalid-toml": b'version = = 1\n[model\nname = "tiny:llama"\n',
    "truncated": b'{"format": 1, "path": null, "saved_at": 1.0, "session": "version = 1\\n[mod',
    "wrapped-invalid-toml": json.dumps({"format": 1, "path": None, "saved_at": 1.0,
                                        "session": "version = = 1\n[model"}).encode(),
    "wrapped-invalid-session": json.dumps({"format": 1, "path": None, "saved_at": 1.0,
                                           "session": "version = 1\n[targets]\nmerge_factor = 0\n"}).encode(),
    "wrong-format": json.dumps({"format": 99, "session": "version = 1\n"}).encode(),
    "not-an-object": b"[1, 2, 3]",
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(BAD_AUTOSAVES) + ["a-folder"])
async def test_corrupt_autosave_is_set_aside_and_the_app_starts(kind):
    from unlearn_tui.tui.app import create_app

    path = session_paths.autosave_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "a-folder":
        path.mkdir()                                        # cannot be read as a file
    else:
        path.write_bytes(BAD_AUTOSAVES[kind])
    app = create_app(settings=settings(), autostart=False)
    assert not app._restored and not app.workspace.dirty
    assert app.workspace.session.targets.merge_factor == 1 and app.workspace.session.path is None     # a new session
    assert not os.path.lexists(path)
    aside = _aside(path.parent, "corrupt")
    assert [p.name.split(".corrupt-")[0] for p in aside] == [path.name]
    if kind != "a-folder":
        assert aside[0].read_bytes() == BAD_AUTOSAVES[kind]                     # kept for the user, unchanged
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        warnings = [m for sev, m in _messages(app) if sev == "warning" and "autosave" in m]
        assert len(warnings) == 1 and "\n" not in warnings[0] and "not restored" in warnings[0]
        assert str(aside[0]) in warnings[0]
        assert app.is_running
    # and the start after that is clean: nothing to restore, nothing to warn about
    again = create_app(settings=settings(), autostart=False)
    assert not again._restored and again._problems == []


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["toml-only", "json-only", "mismatched-pair"])
async def test_half_or_mismatched_old_autosave_pair_is_never_restored(tmp_path, data_file, which):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file)
    toml_path, json_path = session_paths.data_dir() / "autosave.toml", session_paths.data_dir() / "autosave.json"
    toml_path.parent.mkdir(parents=True, exist_ok=True)
    text = session.read_text().replace('mode = "idk"', 'mode = "idk"\nmerge_factor = 7')
    if which in ("toml-only", "mismatched-pair"):
        toml_path.write_text(text, encoding="utf-8")
    if which in ("json-only", "mismatched-pair"):       # meta of another session's autosave
        json_path.write_text(json.dumps({"path": str(tmp_path / "other.toml"), "saved_at": 1.0}))
    app = create_app(settings=settings(), autostart=False)
    assert not app._restored and app.workspace.session.targets.merge_factor == 1 and app.workspace.session.path is None
    assert not os.path.lexists(toml_path) and not os.path.lexists(json_path)
    assert len(_aside(toml_path.parent, "old")) == (2 if which == "mismatched-pair" else 1)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        warnings = [m for sev, m in _messages(app) if sev == "warning" and "autosave" in m]
        assert len(warnings) == 1 and "not restored" in warnings[0] and "\n" not in warnings[0]
        assert app.is_running


def test_valid_autosave_is_restored_and_old_pair_set_aside(tmp_path, data_file):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file)
    path = session_paths.autosave_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_autosave_of(session, 6), encoding="utf-8")
    for p in session_paths.legacy_autosave_paths():
        p.write_text("left by an older version")
    app = create_app(settings=settings(), autostart=False)
    offer = app.restore_offer       # the shared autosave of earlier versions is offered too (asked first)
    assert offer.session.targets.merge_factor == 6 and offer.session.path == session.resolve()
    assert offer.file == path and app.workspace.session.targets.merge_factor == 1
    assert path.is_file() and len(_aside(path.parent, "old")) == 2
    assert len(app._problems) == 1 and "old two-file format" in app._problems[0]


# ===================================================================== a failed data load
@pytest.mark.anyio
async def test_stale_highlight_after_a_failed_data_load_does_not_crash(tmp_path, data_file, llama_handle):
    """The race: the Targets list posts Highlighted(q2); before it is handled, a data load fails."""
    from textual.widgets import ListView

    from unlearn_tui.tui.app import create_app

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await wait_for(pilot, lambda: app.pane("targets") is not None, what="targets pane")
        await pilot.pause()
        lv = app.pane("targets").query_one("#tg-list", ListView)
        assert [c.name for c in lv.children] == ["q1", "q2"]
        mark = len(app.jobs_done)
        lv.index = 1                  # posts Highlighted(q2) ...
        app.file_actions.open_data(str(bad))       # ... and the items are gone before it is delivered
        await wait_for(pilot, lambda: "reload" in app.jobs_done[mark:] and not app.bridge.busy, what="reload")
        await pilot.pause()
        assert app.is_running and app.workspace.items is None and "bad.json" in app.last_error
        assert app.pane("targets").current_item() is None


@pytest.mark.anyio
async def test_failed_reload_leaves_consistent_state_and_panes(tmp_path, data_file, llama_handle):
    """The session's data file turns bad; reopening it fails to load: no pane may show the old items."""
    from textual.widgets import ListView, Static

    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file)
    app = create_app(session, handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await wait_for(pilot, lambda: app.pane("targets") is not None, what="targets pane")
        await pilot.pause()
        assert app.pane("targets").current_item() == "q1"
        app.workspace.baseline_scores = {"q1": 1.0}
        data_file.write_text("{not json", encoding="utf-8")
        mark = len(app.jobs_done)
        app.action_replay()                  # reloads the data (fails), then the run (nothing to run)
        await wait_for(pilot, lambda: "reload" in app.jobs_done[mark:] and not app.bridge.busy
                       and not app.jobs, what="reload")
        await pilot.pause()
        assert "facts.json" in app.last_error or "no data loaded" in app.last_error
        # keys in the Targets pane: move along the list, type a target; nothing looks up a missing item
        app.action_show_tab("targets")
        await pilot.pause()
        await pilot.press("down", "up", "tab", "x", "y")
        await pilot.pause()
        assert app.is_running and app.workspace.session.targets.items == []
        assert app.workspace.items is None and app.workspace.baseline_scores == {} and not app.workspace.baseline_pending
        assert app.workspace.forget_ids == ["q1", "q2"]          # the selection is the session's: kept for a later load
        targets = app.pane("targets")
        assert [c.name for c in targets.query_one("#tg-list", ListView).children] == []
        assert targets.current_item() is None
        assert "no data loaded" in str(targets.query_one("#tg-question", Static).render())
        assert "no data loaded" in str(app.pane("forget").query_one("#fs-counts", Static).render())
        app.refresh_panes()
        await pilot.pause()
        assert app.is_running


# ===================================================================== trust_remote_code
def _remote_code_session(tmp_path: Path, data_file: Path) -> Path:
    p = write_session(tmp_path, data_file)
    p.write_text(p.read_text().replace('name = "tiny:llama"  # the tiny random model',
                                       'name = "tiny:llama"\ntrust_remote_code = true'), encoding="utf-8")
    assert sessions.load(p).model.trust_remote_code is True
    return p


@pytest.fixture
def model_loads(monkeypatch):
    """Record every model load (and give back a tiny model)."""
    from unlearn_tui.backends import model, tiny

    calls = []

    def fake_load(spec=None, *a, **k):
        calls.append(spec)
        return tiny.handle("llama")

    monkeypatch.setattr(model, "load", fake_load)
    return calls


@pytest.mark.anyio
async def test_remote_code_session_is_not_loaded_without_the_flag(tmp_path, data_file, model_loads):
    from unlearn_tui.tui.app import create_app

    app = create_app(_remote_code_session(tmp_path, data_file), settings=settings(), restore=False)
    assert app.trust_remote_code is False
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        errors = [m for sev, m in _messages(app) if sev == "error"]
        assert len(errors) == 1 and "\n" not in errors[0]
        assert "model.trust_remote_code" in errors[0] and "--trust-remote-code" in errors[0]
        assert model_loads == [] and not app.model_ready and app.bridge.workbench.handle is None
        assert app.workspace.items is not None                 # the session itself is shown: its data loaded
        assert "(not loaded)" in app.sub_title
        mark = len(app.jobs_done)
        await pilot.press("ctrl+r")                  # a run needs the model: refused again
        await wait_for(pilot, lambda: "run" in app.jobs_done[mark:] and not app.bridge.busy, what="run")
        assert "--trust-remote-code" in app.last_error and model_loads == []
        assert app.is_running


@pytest.mark.anyio
async def test_remote_code_session_loads_with_the_flag(tmp_path, data_file, model_loads):
    from unlearn_tui.tui.app import create_app

    app = create_app(_remote_code_session(tmp_path, data_file), settings=settings(), restore=False,
                     trust_remote_code=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await wait_for(pilot, lambda: app.model_ready, what="model")
        assert [s.trust_remote_code for s in model_loads] == [True]
        assert not [m for sev, m in _messages(app) if sev == "error"]


@pytest.mark.anyio
async def test_opening_a_remote_code_session_in_the_app_is_refused(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    mine = write_session(tmp_path, data_file)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / data_file.name).write_text(data_file.read_text())
    theirs = _remote_code_session(other_dir, other_dir / data_file.name)
    app = create_app(mine, handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        assert app.file_actions.open_session(theirs) is False
        assert app.workspace.session.path == mine.resolve() and not app.workspace.session.model.trust_remote_code
        assert "model.trust_remote_code" in app.last_error and "--trust-remote-code" in app.last_error


def test_run_app_takes_trust_remote_code(monkeypatch):
    import inspect

    from unlearn_tui.tui import app as app_mod

    seen = {}

    class FakeApp:
        def run(self):
            return 0

    def fake_create(*a, **k):
        seen.update(k)
        return FakeApp()

    monkeypatch.setattr(app_mod, "create_app", fake_create)
    assert inspect.signature(app_mod.run_app).parameters["trust_remote_code"].default is False
    assert app_mod.run_app(trust_remote_code=True) == 0 and seen["trust_remote_code"] is True
    app_mod.run_app()
    assert seen["trust_remote_code"] is False
