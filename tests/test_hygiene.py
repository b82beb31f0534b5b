"""Ground rules: no Textual in the engine; method listings stay torch-free."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTUAL_IMPORT = re.compile(r"^\s*(import textual|from textual)", re.M)


def test_no_textual_import_in_backends_or_sessions_source():
    offenders = [str(p.relative_to(ROOT)) for pkg in ("backends", "sessions") for p in (ROOT / pkg).rglob("*.py")
                 if TEXTUAL_IMPORT.search(p.read_text())]
    assert offenders == []


def test_importing_every_engine_module_never_loads_textual():
    mods = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                   for pkg in ("backends", "sessions") for p in (ROOT / pkg).rglob("*.py")})
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "assert 'textual' not in sys.modules, [m for m in sys.modules if m.startswith('textual')]\n"
            "print(len(" + repr(mods) + "))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(mods) > 10


def test_method_listing_and_params_need_no_torch():
    code = ("import sys\nimport backends.methods as m\nfrom backends.params import describe\n"
            "names = m.names()\nfor n in names:\n    describe(m.get(n).Params)\n"
            "assert 'torch' not in sys.modules, 'torch imported by a method module'\nprint(','.join(names))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert {"none", "ike"} <= set(proc.stdout.strip().split(","))


def test_no_unsafe_torch_load_in_sources():
    bad = [str(p) for pkg in ("backends", "sessions", "tui") for p in (ROOT / pkg).rglob("*.py")
           for line in p.read_text().splitlines() if "torch.load(" in line and "weights_only=True" not in line]
    assert bad == []
