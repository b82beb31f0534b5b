"""The method registry.

Each method lives in its own module under this package and registers a class
with :func:`register`.  Method modules must not import torch at module level
(the TUI lists methods and builds forms before torch is loaded; a test
enforces this): heavy work imports torch inside ``apply``.

Contract::

    class Method:
        name: ClassVar[str]
        Params: ClassVar[type]          # dataclass built with backends.params.param
        summary: ClassVar[str]
        needs_retain: ClassVar[bool]    # refuses to run without a retain split
        def __init__(self, params): ...
        def touched_parameters(self, handle) -> list[str]   # names the transaction snapshots
        def apply(self, handle, requests, ctx) -> dict      # report (free-form, JSON-able)
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UserError
from ..params import unknown_key_message

# name -> module that registers it (imported lazily, in this order for listings)
_MODULES: dict[str, str] = {
    "none": "backends.methods.none",
    "ike": "backends.methods.ike",
}
_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def add_module(name: str, module: str) -> None:
    """Declare where method ``name`` lives (used by method modules added later)."""
    _MODULES[name] = module


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> type:
    key = name.lower().strip()
    if key not in _MODULES:
        raise UserError(unknown_key_message(name, names()).replace("unknown key", "unknown method"))
    if key not in _REGISTRY:
        importlib.import_module(_MODULES[key])
    return _REGISTRY[key]


def make(name: str, raw_params: dict[str, Any] | None, where: str = "params") -> Any:
    from ..params import parse_params

    cls = get(name)
    return cls(parse_params(cls.Params, raw_params, where))
