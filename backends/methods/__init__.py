"""The method registry.

Each method lives in its own module under this package and registers a class
with :func:`register`.  Method modules must not import torch at module level
(the TUI lists methods and builds forms before torch is loaded; a test
enforces this): heavy work imports torch inside ``apply``.

The contract is :class:`backends.methods.base.Method` (a Protocol: ``name``,
``summary``, ``Params``, ``needs_retain``, ``touched_parameters(handle)``,
``apply(handle, requests, ctx) -> dict``); our methods subclass
:class:`~backends.methods.base.MethodBase`.  ``Params`` is the only place a
hyper-parameter default lives.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import UserError
from ..params import unknown_key_message

if TYPE_CHECKING:
    from .base import Method

# name -> module that registers it (imported lazily, in this order for listings)
_MODULES: dict[str, str] = {
    "none": "unlearn_tui.backends.methods.none",
    "ike": "unlearn_tui.backends.methods.ike",
    "rome": "unlearn_tui.backends.methods.rome",
    "memit": "unlearn_tui.backends.methods.memit",
    "alphaedit": "unlearn_tui.backends.methods.alphaedit",
    "wise": "unlearn_tui.backends.methods.wise",
    "grace": "unlearn_tui.backends.methods.grace",
    "ga": "unlearn_tui.backends.methods.finetune",
    "gd": "unlearn_tui.backends.methods.finetune",
    "kl": "unlearn_tui.backends.methods.finetune",
    "dpo": "unlearn_tui.backends.methods.finetune",
    "npo": "unlearn_tui.backends.methods.finetune",
    "simnpo": "unlearn_tui.backends.methods.finetune",
    "undial": "unlearn_tui.backends.methods.finetune",
    "rmu": "unlearn_tui.backends.methods.rmu",
}
_REGISTRY: dict[str, type] = {}

M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    _REGISTRY[cls.name] = cls
    return cls


def add_module(name: str, module: str) -> None:
    """Declare where method ``name`` lives (used by method modules added later)."""
    _MODULES[name] = module


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def names() -> list[str]:
    """Methods whose module is present in this build (no import, no torch)."""
    return [n for n, m in _MODULES.items() if _available(m)]


def get(name: str) -> type:
    key = name.lower().strip()
    if key not in _MODULES or not _available(_MODULES[key]):
        raise UserError(unknown_key_message(name, names()).replace("unknown key", "unknown method"))
    if key not in _REGISTRY:
        importlib.import_module(_MODULES[key])
    return _REGISTRY[key]


def make(name: str, raw_params: dict[str, Any] | None, where: str = "params") -> Method:
    from ..params import parse_params

    cls = get(name)
    return cls(parse_params(cls.Params, raw_params, where))
