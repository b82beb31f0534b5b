"""Ground rules: layers ``tui -> sessions -> backends``; no Textual in the engine; method listings stay torch-free."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTUAL_IMPORT = re.compile(r"^\s*(import textual|from textual)", re.M)


def _imported_modules(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a source file, lazy ones inside functions included.

    ``package`` is the file's package (default: from its place under the repository).
    ``from X import name`` also yields ``X.name`` (the name may be a module);
    ``importlib.import_module("literal")`` counts too.
    """
    if package is None:   # installed, the folders are the packages unlearn_tui.backends, ...
        package = ("unlearn_tui", *path.relative_to(ROOT).parent.parts)
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = list(package[:len(package) - (node.level - 1)] if node.level else [])
            if node.level and node.level - 1 > len(package):
                parts = []
            parts += node.module.split(".") if node.module else []
            out.append((node.lineno, ".".join(parts)))
            out += [(node.lineno, ".".join(parts + [alias.name])) for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            out.append((node.lineno, node.args[0].value))
    return out


def _layer(module: str) -> str:
    """The top folder a module lives in: ``unlearn_tui.sessions.paths`` -> ``sessions`` (so does ``sessions.paths``)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "unlearn_tui" and len(parts) > 1 else parts[0]


def _layer_offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: imports {mod}"
            for p in sorted((ROOT / package).rglob("*.py"))
            for line, mod in _imported_modules(p)
            if _layer(mod) in forbidden]


def test_imported_modules_sees_lazy_relative_and_dynamic_imports(tmp_path):
    """The layer checks are only as good as this: every import form is seen, at its line."""
    src = tmp_path / "probe.py"
    src.write_text("import os\n"
                   "def f():\n    from sessions.paths import cache_dir\n"
                   "    import tui.app\n"
                   "    from .. import sessions\n"
                   "    importlib.import_module('tui')\n"
                   "from .spec import Session\n"
                   "from ..fileio import atomic_write\n")
    mods = _imported_modules(src, ("unlearn_tui", "backends", "editing"))
    assert {(1, "os"), (3, "sessions.paths"), (4, "tui.app"), (6, "tui"),
            (7, "unlearn_tui.backends.editing.spec"), (8, "unlearn_tui.backends.fileio")} <= set(mods)
    assert (5, "unlearn_tui.backends.sessions") in mods    # ``from .. import sessions`` inside backends/editing
    top = _imported_modules(src, ("unlearn_tui", "backends"))
    assert (5, "unlearn_tui.sessions") in top              # ...and climbing out of backends/ to the sessions layer
    assert (7, "unlearn_tui.backends.spec") in top
    assert {_layer(m) for line, m in top if line in (3, 5)} == {"unlearn_tui", "sessions"}   # both forms


def test_backends_never_import_sessions_or_tui():
    """The engine is the bottom layer: no module under backends/ imports sessions or tui, not even lazily."""
    assert _layer_offenders("backends", ("sessions", "tui")) == []


def test_sessions_never_import_tui():
    assert _layer_offenders("sessions", ("tui",)) == []


def test_code_imports_the_packages_by_their_installed_names():
    """Installed, the folders are ``unlearn_tui.*``: a bare ``import backends`` would load a second copy."""
    offenders = [f"{p.relative_to(ROOT)}:{line}: imports {mod}"
                 for pkg in ("backends", "sessions", "tui", "themes", "tests", "benchmarks")
                 for p in sorted((ROOT / pkg).rglob("*.py"))
                 for line, mod in _imported_modules(p)
                 if mod.split(".")[0] in ("backends", "sessions", "tui", "themes")]
    assert offenders == []


def test_experiment_description_modules_are_light():
    """The spec, paths, file IO and compat modules import neither torch, transformers, sessions nor tui."""
    code = ("import sys\nimport unlearn_tui.backends.spec, unlearn_tui.backends.paths, unlearn_tui.backends.fileio\n"
            "import unlearn_tui.backends.compat\n"
            "bad = [m for m in ('torch', 'transformers', 'safetensors', 'unlearn_tui.sessions', 'unlearn_tui.tui', "
            "'textual') "
            "if m in sys.modules]\nassert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_one_toml_compat_import():
    """``tomllib``/``tomli`` is imported in one place only: backends/compat.py."""
    offenders = [f"{p.relative_to(ROOT)}:{line}"
                 for pkg in ("backends", "sessions", "tui") for p in sorted((ROOT / pkg).rglob("*.py"))
                 if p != ROOT / "backends" / "compat.py"
                 for line, mod in _imported_modules(p) if mod.split(".")[0] in ("tomllib", "tomli")]
    assert offenders == [], "use `from unlearn_tui.backends.compat import tomllib`"


def test_no_textual_import_in_backends_or_sessions_source():
    offenders = [str(p.relative_to(ROOT)) for pkg in ("backends", "sessions") for p in (ROOT / pkg).rglob("*.py")
                 if TEXTUAL_IMPORT.search(p.read_text())]
    assert offenders == []


def test_importing_every_engine_module_never_loads_textual():
    mods = sorted({"unlearn_tui." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                   for pkg in ("backends", "sessions") for p in (ROOT / pkg).rglob("*.py")})
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "assert 'textual' not in sys.modules, [m for m in sys.modules if m.startswith('textual')]\n"
            "print(len(" + repr(mods) + "))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(mods) > 10


def test_method_listing_and_params_need_no_torch():
    code = ("import sys\nimport unlearn_tui.backends.methods as m\nfrom unlearn_tui.backends.params import describe\n"
            "names = m.names()\nfor n in names:\n    describe(m.get(n).Params)\n"
            "assert 'torch' not in sys.modules, 'torch imported by a method module'\nprint(','.join(names))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert {"none", "ike"} <= set(proc.stdout.strip().split(","))


def test_no_unsafe_torch_load_in_sources():
    bad = [str(p) for pkg in ("backends", "sessions", "tui") for p in (ROOT / pkg).rglob("*.py")
           for line in p.read_text().splitlines() if "torch.load(" in line and "weights_only=True" not in line]
    assert bad == []
