"""Smoke test: the real ``unlearn-tui`` in tmux, driven by keys, read with ``capture-pane``.

Skipped only when tmux is absent (``.ci/run`` installs it).  Uses the console
script when installed, else ``python -m tui.cli`` (the same entry point).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from unlearn_tui.sessions.paths import AUTOSAVE_NAME
from test_tui_flow import ITEMS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, tmp: Path, width: int = 80, height: int = 24) -> None:
        self.socket = str(tmp / "tmux.sock")
        self.name = f"ut-{uuid.uuid4().hex[:8]}"
        self.width, self.height = width, height

    def run(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        return out.stdout

    def start(self, command: str, env: dict[str, str], cwd: Path) -> None:
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        self.run("new-session", "-d", "-s", self.name, "-x", str(self.width), "-y", str(self.height),
                 f"cd {shlex.quote(str(cwd))} && env TERM=tmux-256color {exports} {command}; "
                 f"echo UNLEARN-EXIT=$?; sleep 60")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.name)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.name, *keys)

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        t0 = time.monotonic()
        screen = ""
        while time.monotonic() - t0 < timeout:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{text!r} did not appear; screen:\n{screen}")

    def press_until(self, key: str, text: str, tries: int = 5, wait: float = 10.0) -> str:
        """Send ``key`` until ``text`` shows (an escape sequence can be split under heavy load)."""
        for _ in range(tries):
            self.keys(key)
            try:
                return self.wait_for(text, timeout=wait)
            except AssertionError:
                continue
        return self.wait_for(text, timeout=1)

    def wait_gone(self, text: str, timeout: float = 30.0) -> str:
        t0 = time.monotonic()
        screen = self.screen()
        while text in screen and time.monotonic() - t0 < timeout:
            time.sleep(0.3)
            screen = self.screen()
        return screen

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


def command() -> str:
    exe = shutil.which("unlearn-tui", path=str(Path(sys.executable).parent))
    return shlex.quote(exe) if exe else f"{shlex.quote(sys.executable)} -m tui.cli"


def test_real_app_in_tmux(tmp_path):
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(ITEMS), encoding="utf-8")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings.toml").write_text("baseline_on_load = false\n")
    session = tmp_path / "s.toml"
    session.write_text('version = 1\n[model]\nname = "tiny:llama"\n[data]\npath = "facts.json"\nforget = ["q1"]\n'
                       'retain = ["q3"]\n[eval]\nmax_new_tokens = 4\n[[runs]]\nmethod = "ike"\n')
    env = {"UNLEARN_TUI_CONFIG_DIR": str(tmp_path / "cfg"), "UNLEARN_TUI_DATA_DIR": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t = Tmux(tmp_path)
    try:
        t.start(f"{command()} s.toml --model tiny:llama", env, tmp_path)
        screen = t.wait_for("1 forget · 1 retain")
        assert "What is the capital of France?" in screen and "^r Run" in screen
        t.wait_for("model ready")
        # select q2 for forgetting: cursor on the first row, move down, space
        t.keys("Down", "Space")
        t.wait_for("2 forget · 1 retain")
        t.keys("C-r")
        t.wait_for("finished: 1 run(s)")
        screen = t.press_until("F6", " ike ")
        row = next(line for line in screen.splitlines() if " ike " in line)
        numbers = [w for w in row.split() if w.lstrip("+-").replace(".", "", 1).isdigit() and "." in w]
        # composite first, its difference from the baseline (signed), then the forget/retain/rephrase scores
        assert len(numbers) >= 5 and numbers[1][0] in "+-", row
        # the help screen lists the keys
        t.press_until("F1", "unlearn-tui — keys")
        for _ in range(5):   # a lone Escape can be merged with the next key under load: retry
            t.keys("Escape")
            if "unlearn-tui — keys" not in t.wait_gone("unlearn-tui — keys", timeout=5):
                break
        assert "unlearn-tui — keys" not in t.screen()
        # quit: unsaved changes -> the confirm dialog, then discard
        t.press_until("C-q", "Save before quitting?")
        t.keys("d")
        final = t.wait_for("UNLEARN-EXIT=", timeout=60)
        assert "UNLEARN-EXIT=0" in final, final
        assert "Traceback" not in final, final
        assert not (tmp_path / "data" / AUTOSAVE_NAME).exists()   # a clean quit drops the autosave
        left = tmp_path / "data" / "autosaves"
        assert not left.exists() or list(left.iterdir()) == []     # (one per session, in autosaves/)
    finally:
        t.kill()
