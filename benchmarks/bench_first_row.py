"""From ``python3 dev.py run SESSION`` to the first ROME row, in a real terminal (issue 16).

Launches the app in a tmux pane (80x24 unless ``--size``) on a session of 5
forget / 5 retain built-in facts with one ROME run, in a fresh cache folder
that holds only the converted embedded model (known scores and statistics are
cold), presses ctrl+r at the first frame (the run queues after start-up) and
polls ``capture-pane`` every 0.5 s.  Printed: when each progress stage first
appeared and when the app said the run finished (its row is then in
Results), with each phase's share of the total.

    python benchmarks/bench_first_row.py [--size 80x24] [--timeout 900]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSION = """version = 1
[model]
name = "smollm2-135m-instruct"
[data]
path = "builtin:world-facts"
forget = 5
retain = 5
[targets]
mode = "idk"
[[runs]]
method = "rome"
"""
STAGE = re.compile(r"([a-zA-Z][\w :()-]{2,40}?)\s+\d+/\d+")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="80x24")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args(argv)
    if not shutil.which("tmux"):
        print("skipped: tmux is not installed")
        return 0
    sys.path.insert(0, str(ROOT))
    from unlearn_tui.backends.paths import cache_dir

    models = cache_dir() / "models"
    if not models.is_dir():
        print(f"skipped: no converted model in {models} (run the app once first)")
        return 0
    cols, rows = a.size.split("x")
    tmp = Path(tempfile.mkdtemp(prefix="first-row-"))
    (tmp / "cache").mkdir()
    (tmp / "cache" / "models").symlink_to(models)
    (tmp / "s.toml").write_text(SESSION)
    name = f"first-row-{int(time.time())}"
    t0 = time.monotonic()
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", cols, "-y", rows,
                    f"cd {ROOT} && UNLEARN_TUI_CACHE_DIR={tmp / 'cache'} python3 dev.py run {tmp / 's.toml'}; "
                    "sleep 600"], check=True)
    marks: list[tuple[float, str]] = []
    seen: set[str] = set()
    pressed = done = False
    try:
        while time.monotonic() - t0 < a.timeout and not done:
            cap = subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout
            now = time.monotonic() - t0
            if not pressed and "Forget" in cap:
                subprocess.run(["tmux", "send-keys", "-t", name, "C-r"])
                pressed = True
                marks.append((now, "first frame (ctrl+r pressed)"))
            for line in cap.splitlines():
                m = STAGE.search(line)
                if m and m.group(1).strip() not in seen:
                    seen.add(m.group(1).strip())
                    marks.append((now, m.group(1).strip()))
            if "finished: 1 run(s)" in cap:
                marks.append((now, "finished: the ROME row is in Results"))
                done = True
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    total = marks[-1][0] if marks else 0.0
    prev = 0.0
    for t, label in marks:
        print(f"{t:7.1f} s  (+{t - prev:5.1f} s, {100 * (t - prev) / max(total, 1e-9):4.1f}%)  {label}")
        prev = t
    print(("first ROME row after" if done else "no row within") + f" {total if done else a.timeout:.1f} s")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
