"""Time to first frame of the unlearn-tui app (target: well under one second).

Each sample is a fresh Python process (spawned by this script) that builds the
app with ``tui.app.create_app`` and runs it headless; the child reports the
wall-clock time of its first frame (``App.first_frame`` hook, taken right
after the first screen refresh) and whether torch had been imported by then
(it must not be), then how long until every pane is mounted (all but the
Forget set pane are built after the first frame).  The figure is spawn → first frame, so it includes the
interpreter start and every import.

With ``--tmux`` it also launches the real ``unlearn-tui`` in a tmux pane and
polls ``capture-pane`` until the footer is drawn (a real terminal; the poll
adds up to ~20 ms).

    python benchmarks/bench_startup.py [--runs 5] [--tmux]

Prints the figures and the ratio to the one-second target.  Timings on a
shared machine vary with load: report the load average with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0

CHILD = r"""
import json, sys, time, asyncio
from unlearn_tui.tui.app import create_app
from unlearn_tui.tui.settings import Settings

async def main():
    app = create_app(model="tiny:llama", settings=Settings(baseline_on_load=False), autostart=False, restore=False)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.first_frame is None:
            await pilot.pause(0.001)
        from unlearn_tui.tui.app import START
        wall = time.time() - (time.perf_counter() - START - app.first_frame)
        # the other panes are built right after the first frame: time until every pane is ready too
        while any(app.pane(n) is None for n in ("forget", "targets", "method", "run", "results", "probe")):
            await pilot.pause(0.001)
        print(json.dumps({"wall": wall, "ready_wall": time.time(),
                          "first_frame_after_import_s": app.first_frame,
                          "torch": app.torch_at_first_frame}))
asyncio.run(main())
"""


HELLO = r"""
import json, time, asyncio
t_import = time.time()
from textual.app import App
from textual.widgets import Static, Footer

class Hello(App):
    def compose(self):
        yield Static("hello")
        yield Footer()
    def _display(self, screen, renderable):
        if getattr(self, "first", None) is None and renderable is not None and not self._batch_count:
            self.first = time.time()
        super()._display(screen, renderable)

async def main():
    app = Hello()
    app.first = None
    async with app.run_test(size=(120, 40)) as pilot:
        while app.first is None:
            await pilot.pause(0.001)
        print(json.dumps({"wall": app.first}))
asyncio.run(main())
"""


def hello_sample(tmp: Path) -> float:
    """The same measurement for a two-widget Textual app: the floor on this machine right now."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", HELLO], capture_output=True, text=True, env=env(tmp), timeout=120)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["wall"] - t0


def env(tmp: Path) -> dict:
    e = dict(os.environ)
    e.update({"UNLEARN_TUI_CONFIG_DIR": str(tmp / "config"), "UNLEARN_TUI_DATA_DIR": str(tmp / "data"),
              "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    return e


def headless_sample(tmp: Path) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env(tmp), cwd=tmp,
                         timeout=120)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["spawn_to_first_frame_s"] = res["wall"] - t0
    res["spawn_to_all_panes_s"] = res["ready_wall"] - t0
    return res


def import_sample(tmp: Path) -> float:
    code = "import time; t=time.perf_counter(); import tui.app; print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(tmp), timeout=60)
    return float(out.stdout.strip())


def bare_python_sample() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.time() - t0


def tmux_sample(tmp: Path) -> float | None:
    if shutil.which("tmux") is None:
        return None
    sock = str(tmp / f"bench-{time.time_ns()}.sock")   # one server per sample: a reused socket can race
    exe = shutil.which("unlearn-tui", path=str(Path(sys.executable).parent))
    cmd = shlex.quote(exe) if exe else f"{shlex.quote(sys.executable)} -m tui.cli"
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env(tmp).items()
                       if k.startswith(("UNLEARN_TUI", "PYTHONPATH", "HF_")))
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "settings.toml").write_text("baseline_on_load = false\n")
    t0 = time.time()
    started = subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-s", "b", "-x", "120", "-y", "40",
                              f"cd {shlex.quote(str(tmp))} && env {exports} {cmd} --model tiny:llama; sleep 30"],
                             capture_output=True, text=True)
    if started.returncode != 0:
        print(f"tmux: could not start a session ({started.stderr.strip()}); sample skipped", file=sys.stderr)
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)
        return None
    try:
        while time.time() - t0 < 60:
            screen = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p", "-t", "b"], capture_output=True,
                                    text=True).stdout
            if "^r Run" in screen:
                return time.time() - t0
            time.sleep(0.02)
        return None
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tmux", action="store_true", help="also time the real app in a tmux pane")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"(shared machine: figures vary with contention)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bare = statistics.median(bare_python_sample() for _ in range(3))
        imports = [import_sample(tmp) for _ in range(args.runs)]
        samples, hello = [], []
        for _ in range(args.runs):       # interleaved, so both see the same load
            samples.append(headless_sample(tmp))
            hello.append(hello_sample(tmp))
        spawn = [s["spawn_to_first_frame_s"] for s in samples]
        torch_seen = any(s["torch"] for s in samples)
        med = statistics.median(spawn)
        print(f"bare python start          median {bare * 1000:7.0f} ms")
        print(f"import tui.app             median {statistics.median(imports) * 1000:7.0f} ms  "
              f"(min {min(imports) * 1000:.0f})")
        print(f"spawn -> first frame       median {med * 1000:7.0f} ms  (min {min(spawn) * 1000:.0f}, "
              f"max {max(spawn) * 1000:.0f}, n={len(spawn)}) [headless driver]")
        ready = [s["spawn_to_all_panes_s"] for s in samples]
        print(f"spawn -> every pane ready  median {statistics.median(ready) * 1000:7.0f} ms  "
              f"(panes other than the Forget set are built after the first frame)")
        hmed = statistics.median(hello)
        print(f"hello-world Textual app    median {hmed * 1000:7.0f} ms  (same driver and load; the floor)")
        print(f"ratio unlearn-tui / hello-world: {med / hmed:.2f}")
        print(f"torch imported before first frame: {'YES (bug)' if torch_seen else 'no'}")
        print(f"ratio to the {TARGET_S:.0f} s target: {med / TARGET_S:.2f}")
        if args.tmux:
            t = [x for x in (tmux_sample(tmp) for _ in range(max(1, args.runs // 2))) if x is not None]
            if t:
                print(f"tmux: launch -> footer drawn median {statistics.median(t) * 1000:7.0f} ms "
                      f"(n={len(t)}; real terminal, polled every 20 ms); ratio {statistics.median(t) / TARGET_S:.2f}")
            else:
                print("tmux: not available or the app did not draw within 60 s")


if __name__ == "__main__":
    main()
