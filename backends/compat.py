"""The one place that knows how installed libraries differ between versions.

* ``tomllib``: the standard library's TOML reader on Python >= 3.11, the
  ``tomli`` package (the same API) on 3.10.  Every module reads TOML through
  ``from backends.compat import tomllib``.
* The KV cache: transformers 5.x renamed the ``past_key_values`` argument
  and output field to ``cache`` (the old name still works with a
  FutureWarning and is removed in 5.40).  Code that passes a cache to
  ``forward``, reads one from an output, or inspects a call's keyword
  arguments (forward pre-hooks) goes through :func:`cache_kwarg`,
  :func:`output_cache` and :func:`call_cache`, so it works on both sides of
  the rename and never warns.
"""

from __future__ import annotations

import inspect
import sys
from functools import cache
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["tomllib", "CACHE_NAMES", "cache_kwarg", "output_cache", "call_cache"]

CACHE_NAMES = ("cache", "past_key_values")


@cache
def _cache_name_for(cls: Any) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model.forward`` takes a KV cache."""
    return _cache_name_for(model.__class__)


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (``None`` when it has none)."""
    for name in CACHE_NAMES:
        if isinstance(out, dict) and name in out:
            return out[name]
    return None


def call_cache(kwargs: dict) -> Any:
    """The KV cache a forward call was given, under either name (forward pre-hooks)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
