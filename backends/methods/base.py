"""The method contract, the context a method runs in, and the bases shared across method modules (torch-free).

The contract (:class:`Method`) is what the registry, the runner and the app
rely on; it is a :class:`typing.Protocol`, so a test can register a plain
class that merely has these members.  Our own methods subclass
:class:`MethodBase`, the small ABC that implements it (``params`` stored,
``touched_parameters`` and ``apply`` abstract).

Families of methods share a base here when they live in more than one
module: :class:`SpreadLayers` (MEMIT, AlphaEdit: the layer range, the touched
matrices and the spread driver, with the solver chosen by the subclass) and
:class:`OneLayerAdaptor` (WISE, GRACE: one layer's inference-time adaptor).
The fine-tuning base lives with its five methods in :mod:`.finetune` (nothing
else uses it, and its loss hooks read best next to the terms that fill them).

Defaults live in ``Params`` only.  The engine's settings objects
(``WiseConfig``, ``GraceConfig``, ``TrainConfig``) are frozen dataclasses
without defaults, built by :func:`settings_view` from the method's Params plus
the values the method resolved (``auto`` fields, the seed); the locate-edit
kernels read the Params themselves.

Nothing here imports torch: the registry lists methods and builds forms
before torch is loaded (a test checks this).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from ..editing.locate_params import auto_layers, check_layers
from ..events import CancelToken, EventCallback, Log, Tracker

if TYPE_CHECKING:
    from ..editing.locate import SpreadSolver
    from ..model import ModelHandle
    from ..targets import Request


@dataclass
class EditContext:
    """What a method's ``apply`` gets besides the handle and the requests."""

    on_event: EventCallback
    cancel: CancelToken
    forget: list
    retain: list
    state: dict            # per-session, per-method scratch (e.g. accumulated keys)
    seed: int = 0
    cache: dict = field(default_factory=dict)
    # the session's folder: file paths in the params are relative to it and confined to it (None: the
    # engine driven from Python, paths relative to the current directory)
    base_dir: Path | None = None
    where: str = "params"  # where the params live in the session, for error messages ("runs[2].params")


@runtime_checkable
class Method(Protocol):
    """What every registered method provides (the registry's, the runner's and the app's view)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type]        # a dataclass built with backends.params.param: the only home of a default
    needs_retain: ClassVar[bool]  # refuses to run without a retain split (may depend on the params: RetainWhen)
    params: Any

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        """The parameter names the transaction snapshots (validates the params against the model)."""
        ...

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        """Edit the model (or install a wrapper); returns a free-form JSON-able report."""
        ...


class MethodBase(abc.ABC):
    """The base of our methods: stores the params; subclasses declare the class members and the two hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_retain: ClassVar[bool] = False
    # False only for a method that never changes the model (``none``): its scores are the baseline's,
    # so a run reuses the baseline evaluation instead of evaluating the same model twice
    changes_model: ClassVar[bool] = True
    Params: ClassVar[type]

    def __init__(self, params: Any) -> None:
        self.params = params

    @abc.abstractmethod
    def touched_parameters(self, handle: ModelHandle) -> list[str]: ...

    @abc.abstractmethod
    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]: ...


class RetainWhen:
    """``needs_retain`` that depends on the params: the class reads ``default``, an instance ``rule(params)``.

    (DPO and NPO need retain data only while their retain term is on.)
    """

    def __init__(self, default: bool, rule: Callable[[Any], bool]) -> None:
        self.default = default
        self.rule = rule

    def __get__(self, obj: Any, owner: type | None = None) -> bool:
        return self.default if obj is None else bool(self.rule(obj.params))


C = TypeVar("C")


def settings_view(cls: type[C], params: Any, **resolved: Any) -> C:
    """Build the engine settings ``cls`` from a method's Params and the values the method resolved.

    Every field of ``cls`` takes the same-named Params value unless ``resolved``
    gives it.  ``cls`` may declare no defaults, a field neither side provides is
    an error, and so is an ``auto`` Params field left at ``None``: engine
    settings can never fall back on a default of their own.
    """
    pfields = {f.name: f for f in dataclasses.fields(params)}
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} declares a default; defaults belong in the method's Params")
        if f.name in resolved:
            values[f.name] = resolved.pop(f.name)
        elif f.name in pfields:
            value = getattr(params, f.name)
            if value is None and pfields[f.name].metadata.get("auto"):
                raise TypeError(f"{type(params).__qualname__}.{f.name} is auto (None); resolve it for "
                                f"{cls.__name__}")
            values[f.name] = value
        else:
            raise TypeError(f"{cls.__name__}.{f.name} is neither in {type(params).__qualname__} nor resolved")
    if resolved:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(resolved))}")
    return cls(**values)


# --------------------------------------------------------------------------- MEMIT / AlphaEdit


class SpreadLayers(MethodBase):
    """What MEMIT and AlphaEdit share: the layer range, the touched matrices, and the spread driver.

    The subclass picks the per-layer solver (:meth:`solver`): MEMIT's
    covariance-regularised least squares or AlphaEdit's null-space projection.
    ``apply`` imports the torch driver lazily.
    """

    def layers(self, handle: ModelHandle) -> list[int]:
        if self.params.layers is None:
            return auto_layers(handle.adapter.n_layers)
        return check_layers(list(self.params.layers), handle.adapter, "params.layers")

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        return [handle.adapter.mlp_out_weight_name(layer) for layer in self.layers(handle)]

    @abc.abstractmethod
    def solver(self) -> SpreadSolver:
        """A fresh solver for one apply (it may carry state between the layers of one apply)."""

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        from ..editing.locate import apply_spread

        return apply_spread(handle, requests, self.params, self.layers(handle), ctx, self.solver(), self.name)


# --------------------------------------------------------------------------- WISE / GRACE

# both reference configs edit layer 27 of a 32-layer Llama: 27/31 of the way down the stack
REF_DEPTH_SHARE = 0.93


def resolve_layer(handle: ModelHandle, layer: int | None, frac: float, key: str) -> int:
    """``layer`` (negative counts from the end) or, when None, ``round(frac * (n - 1))``; range-checked."""
    n = handle.adapter.n_layers
    if layer is None:
        return max(0, min(n - 1, int(round(frac * (n - 1)))))
    return handle.adapter.check_layer(layer, key)


def inner_params_layer(value: Any) -> int:
    """EasyEdit's ``inner_params: [model.layers[27].mlp.down_proj.weight]`` -> 27."""
    text = value[0] if isinstance(value, (list, tuple)) and value else value
    m = re.search(r"(?:layers|h)\[?\.?(\d+)\]?", str(text))
    if not m:
        raise ValueError(f"no layer index in {text!r}")
    return int(m.group(1))


class OneLayerAdaptor(MethodBase):
    """Base of WISE and GRACE: an inference-time adaptor on ONE layer; the model's weights are never written.

    Their state lives in the wrapper, which the transaction snapshots, so
    ``touched_parameters`` is empty.  The tensor work lives in
    :mod:`backends.editing.lifelong`, :mod:`~backends.editing.wise_memory` and
    :mod:`~backends.editing.grace_codebook`.
    """

    depth_share: ClassVar[float] = REF_DEPTH_SHARE

    def layer(self, handle: ModelHandle) -> int:
        return resolve_layer(handle, self.params.layer, self.depth_share, "params.layer")

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        self.layer(handle)  # validate before the transaction starts
        return []

    def state_paths(self, ctx: EditContext, kind: str) -> tuple[Path | None, Path | None]:
        """(load_state, save_state) resolved against the session folder and confined to it.

        A ``save_state`` target is checked now, before any work: a bad target
        fails at once, not after the edits (``kind`` is the state file's kind).
        """
        from ..editing.lifelong import check_state_target, session_path

        p, where = self.params, ctx.where
        load = session_path(p.load_state, ctx.base_dir, f"{where}.load_state", p.allow_outside) \
            if p.load_state else None
        save = session_path(p.save_state, ctx.base_dir, f"{where}.save_state", p.allow_outside) \
            if p.save_state else None
        if save is not None:
            check_state_target(save, kind, f"{where}.save_state", p.overwrite)
        return load, save

    @staticmethod
    def installed(handle: ModelHandle, kind: type, layer: int) -> Any:
        """The adaptor of type ``kind`` already wrapping ``layer``, or None."""
        return next((w for w in handle.wrappers if isinstance(w, kind) and w.layer == layer), None)

    def install_loaded(self, handle: ModelHandle, existing: Any, loaded: Any, ctx: EditContext, what: str,
                       save_path: Path | None) -> None:
        """Put a loaded adaptor in place of ``existing`` (if any), report it, and save it when asked."""
        if existing is not None:
            handle.remove_wrapper(existing)
        handle.add_wrapper(loaded)
        Tracker(ctx.on_event, ctx.cancel, f"{self.name}: load {what}", 1).step(detail=self.params.load_state)
        self.save_if_asked(loaded, save_path, ctx)

    def finish(self, adaptor: Any, runner: Any, save_path: Path | None, ctx: EditContext) -> None:
        """After the edits: say when the suffix shortcut fell back to full forwards; save when asked."""
        if runner.fast is False:
            ctx.on_event(Log(f"{self.name}: the suffix shortcut did not match this architecture; used full "
                             "forwards", "warning"))
        self.save_if_asked(adaptor, save_path, ctx)

    def save_if_asked(self, adaptor: Any, save_path: Path | None, ctx: EditContext) -> None:
        if save_path is not None:
            adaptor.save_state(str(save_path), f"{ctx.where}.save_state", self.params.overwrite)

    def edit_each(self, requests: Sequence[Request], ctx: EditContext, n_iter: int,
                  train: Callable[[Request, Callable[[float], None]], dict],
                  detail: Callable[[dict], str]) -> list[dict]:
        """Train the requests one after another with progress per edit and per step; the per-edit reports."""
        edits = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: edits", len(requests))
        per_edit = []
        for i, r in enumerate(requests):
            steps = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: edit {i + 1}/{len(requests)}", n_iter,
                            detail=r.prompt[:60])
            info = train(r, lambda loss, steps=steps: steps.step(loss=loss))
            info["item_ids"] = list(r.item_ids)
            per_edit.append(info)
            edits.step(loss=info.get("nll"), detail=detail(info))
        return per_edit


__all__ = ["EditContext", "Method", "MethodBase", "OneLayerAdaptor", "RetainWhen", "SpreadLayers",
           "inner_params_layer", "resolve_layer", "settings_view"]
