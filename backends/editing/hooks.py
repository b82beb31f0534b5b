"""Forward hooks: read a module's input/output, or rewrite its output.

All helpers are context managers that remove their hooks on exit, also on
exceptions, so a failed or cancelled edit never leaves a hook behind.

* :func:`capture` records the input (``what="input"``, the first positional
  argument — for an MLP output projection that is the *key*) or the output of
  modules by name during the forward passes run inside the block.
* :func:`stop_after` ends a forward pass right after a module ran, so reading
  keys at layer ``L`` costs ``L + 1`` blocks instead of the whole model and
  never materialises the ``(batch, seq, vocab)`` logits.
* :func:`rewrite_output` replaces a module's output by ``fn(output)``; used to
  add an optimised vector at a token position (value optimisation) or to
  route to a side memory (WISE/GRACE install persistent variants of this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: Any) -> Any:
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    return new


@contextlib.contextmanager
def capture(model: Any, names: list[str], what: str = "input", detach: bool = True) -> Iterator[dict[str, list]]:
    """Collect, per module name, the tensors seen in each forward pass."""
    store: dict[str, list] = {n: [] for n in names}
    handles = []
    try:
        for n in names:
            mod = model.get_submodule(n)
            if what == "input":
                def pre(m, args, n=n):
                    t = args[0]
                    store[n].append(t.detach() if detach else t)
                handles.append(mod.register_forward_pre_hook(pre))
            elif what == "output":
                def post(m, args, out, n=n):
                    t = _first(out)
                    store[n].append(t.detach() if detach else t)
                handles.append(mod.register_forward_hook(post))
            else:
                raise ValueError(f"what must be 'input' or 'output', not {what!r}")
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def rewrite_output(model: Any, name: str, fn: Callable[[Any], Any]) -> Iterator[None]:
    """Replace module ``name``'s (first) output by ``fn(output)`` inside the block."""
    mod = model.get_submodule(name)

    def post(m, args, out):
        return _replace_first(out, fn(_first(out)))

    h = mod.register_forward_hook(post)
    try:
        yield
    finally:
        h.remove()


def install_output_hook(model: Any, name: str, fn: Callable[[Any, Any], Any]):
    """A persistent hook ``fn(inputs, output) -> output | None``; returns the removable handle."""
    mod = model.get_submodule(name)

    def post(m, args, out):
        new = fn(args, _first(out))
        return None if new is None else _replace_first(out, new)

    return mod.register_forward_hook(post)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: :func:`stop_after`'s, and the block-input hook of
    :class:`backends.editing.lifelong.SuffixRunner`."""


@contextlib.contextmanager
def stop_after(model: Any, name: str | None) -> Iterator[None]:
    """Inside the block, a forward pass ends (silently) once module ``name`` produced its output.

    Register it after any :func:`capture` on the same module (hooks run in
    registration order).  ``name=None`` is a no-op.
    """
    if name is None:
        yield
        return
    mod = model.get_submodule(name)

    def post(m, args, out):
        raise StopForward

    h = mod.register_forward_hook(post)
    try:
        yield
    except StopForward:
        pass
    finally:
        h.remove()
