"""Take the edited model away: a Hugging Face folder, or a delta of the changed tensors (``unlearn-tui export``).

Given a :class:`~backends.model.ModelHandle` whose edits are applied and
kept (the undo stack of a :class:`~backends.runner.Workbench`), :func:`export`
writes OUT_DIR in one of two forms:

* **full** (default): ``model.save_pretrained(OUT_DIR, safe_serialization=True)``
  plus the tokenizer, loadable by plain
  ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)``.  A model
  dequantised from GGUF whose config still says "quantized" is written by
  :func:`backends.model._save_plain` instead (config without the quantization
  block, each tied tensor once: loading re-ties it).  Inference-time wrappers
  (WISE, GRACE, IKE) live outside the weights, so a plain folder cannot carry
  them: the full export of such a model is **refused** with one line that
  says to use ``--delta``.
* **delta** (``delta=True``): ``delta.safetensors`` with only the tensors the
  kept edits changed (the transactions name the parameters they touched;
  those still equal to the base are left out), the wrappers' state
  (``wrappers/N-wise.safetensors``, ``N-grace.safetensors``, ``N-ike.json``)
  and the tokenizer.  :func:`apply_delta` lays it onto a freshly loaded base
  model; it first checks the SHA-256 of the model's whole state dict against
  the base recorded at export (``base_state_hash``) and refuses any other
  model with one line.  A session with ``[finetune]`` has no delta form (its
  base is the fine-tuned model, which a fresh load does not give): use the
  full folder.

Both write ``unlearn_tui_export.json`` (format, kind, session, model,
methods, base fingerprint and state hashes, the kept edits in order, the
tensors and wrappers of a delta).  The folder is built under a temporary
name and renamed into place (:func:`backends.fileio.atomic_folder`): a
failure or a cancel leaves nothing half-written.  An existing OUT_DIR is
replaced only when it is empty or an earlier export (it holds
``unlearn_tui_export.json``), or with ``force``; never when it holds a file
the session needs (``protect``).

Torch-free at import; never imports textual, sessions or tui.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .events import CancelToken, EventCallback, Tracker, ignore

if TYPE_CHECKING:
    from .model import ModelHandle

EXPORT_FILE = "unlearn_tui_export.json"
DELTA_FILE = "delta.safetensors"
WRAPPER_DIR = "wrappers"
FORMAT = 1
WHERE = "OUT_DIR"


# ---------------------------------------------------------------- the target folder
def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an earlier export (it holds :data:`EXPORT_FILE`)."""
    return (folder / EXPORT_FILE).is_file()


def check_out_dir(out: str | Path, force: bool = False, protect: Iterable[Path] = ()) -> Path:
    """Validate OUT_DIR before any work (UserError at ``OUT_DIR``); nothing is created.

    The parent folder must exist; an existing OUT_DIR must be a folder that is
    empty or an earlier export, unless ``force``; a folder holding one of the
    ``protect`` files (the session, its data) is refused even with ``force``.
    """
    from .fileio import probe_writable

    if not str(out).strip():
        raise UserError('expected a folder for the exported model, got ""', WHERE)
    p = Path(out).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UserError(f"{p} is a file; expected a folder for the exported model", WHERE)
    real = p.resolve()
    for f in protect:
        try:
            inside = Path(f).expanduser().absolute().resolve().is_relative_to(real)
        except (OSError, ValueError):
            inside = False
        if inside:
            raise UserError(f"{p} holds {Path(f).name}, which the session needs; exporting there would replace "
                            "it; give another folder", WHERE)
    if p.is_dir() and not force:
        try:
            empty = not any(p.iterdir())
        except OSError as exc:
            raise UserError(f"cannot read {p} ({exc.strerror or exc}); expected a readable folder", WHERE) from None
        if not empty and not is_export(p):
            raise UserError(f"{p} is not empty and is not an earlier export; give a new or empty folder "
                            "(or --force to replace it)", WHERE)
    parent = p.parent
    if not parent.is_dir():
        raise UserError(f"directory {parent} does not exist", WHERE)
    try:
        probe_writable(parent / p.name)
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror or exc})", WHERE) from None
    return p


# ---------------------------------------------------------------- hashing
def state_hash(model: Any) -> str:
    """SHA-256 of the model's whole state dict (the same bytes as :func:`backends.model.state_hash`)."""
    from .model import state_hash as _hash

    return _hash(model)


def _edits(stack: Sequence[Any]) -> list[dict]:
    return [dict(getattr(tx, "edit", None) or {"method": "?"}) for tx in stack]


def _touched(stack: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(n for tx in stack for n in tx.names))


def _wrapper_kind(w: Any) -> str:
    from .editing.grace_codebook import GraceCodebook
    from .editing.wise_memory import WiseMemory
    from .methods.ike import IKEWrapper

    for cls, kind in ((WiseMemory, "wise"), (GraceCodebook, "grace"), (IKEWrapper, "ike")):
        if isinstance(w, cls):
            return kind
    raise UserError(f'the model carries a "{getattr(w, "name", type(w).__name__)}" wrapper that cannot be '
                    "exported; expected WISE, GRACE or IKE", "export")


# ---------------------------------------------------------------- export
def export(handle: ModelHandle, out: str | Path, stack: Sequence[Any] = (), *, delta: bool = False,
           force: bool = False, info: dict | None = None, on_event: EventCallback = ignore,
           cancel: CancelToken | None = None, finetuned: bool = False, protect: Iterable[Path] = ()) -> Path:
    """Write the edited model (``handle`` with the kept transactions ``stack`` applied) to ``out``.

    ``info``: what the export file records besides (session name, model name).
    ``finetuned``: the model under the edits is a ``[finetune]`` of the loaded
    one (no delta form).  Returns the folder.  See the module doc.
    """
    import torch

    from .fileio import atomic_folder

    target = check_out_dir(out, force, protect)
    kinds = [_wrapper_kind(w) for w in handle.wrappers]
    if not delta and kinds:
        raise UserError(f"the edited model has inference-time wrappers ({', '.join(k.upper() for k in kinds)}) "
                        "that a plain Hugging Face folder cannot carry; export it with --delta (the changed "
                        "tensors plus the wrapper state and a loader)", "export")
    if delta and finetuned:
        raise UserError("a delta cannot carry the [finetune] step (a fresh load of the model is not the "
                        "fine-tuned base); export the full folder instead (without --delta)", "export")
    if not delta:
        off = next((n for n, p in handle.model.named_parameters() if p.device.type == "meta"), None)
        if off is not None:
            raise UserError(f'"{off}" is offloaded by model.device_map; a full export needs every weight in '
                            "memory; export with --delta (only the edited tensors)", "export")
    touched = _touched(stack)
    tracker = Tracker(on_event, cancel, "export: " + ("delta" if delta else "model"), 4, detail=str(target))
    # the base: every kept edit undone (exact: the transactions' snapshots), then redone
    for tx in reversed(stack):
        tx.undo()
    try:
        fingerprint = handle.fingerprint
        base_hash = state_hash(handle.model)
        base = {n: handle.parameter(n).detach().to("cpu", copy=True) for n in touched} if delta else {}
    finally:
        for tx in stack:
            tx.redo()
    edited_hash = state_hash(handle.model)
    tracker.step(detail="hashed the base and edited weights")
    changed = [n for n in touched if delta and not torch.equal(handle.parameter(n).detach().cpu(), base[n])]
    edits = _edits(stack)
    meta: dict[str, Any] = {
        "format": FORMAT, "kind": "delta" if delta else "full", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(info or {}),
        "methods": list(dict.fromkeys(e.get("method", "?") for e in edits)),
        "base_fingerprint": fingerprint, "base_state_hash": base_hash, "edited_state_hash": edited_hash,
        "dtype": str(handle.dtype).replace("torch.", ""), "edits": edits,
    }
    meta.setdefault("model", handle.name)
    with atomic_folder(target) as tmp:
        if delta:
            from .fileio import save_safetensors

            tensors = {n: handle.parameter(n).detach().to("cpu").contiguous().clone() for n in changed}
            digests = {n: _digest(base[n]) for n in changed}
            if tensors:
                save_safetensors(tmp / DELTA_FILE, tensors, {"unlearn_tui": json.dumps(
                    {"kind": "unlearn-tui-delta", "base": digests})})
            tracker.step(detail=f"{len(tensors)} changed tensor(s)")
            wrappers = _save_wrappers(handle, tmp, kinds)
            meta.update(tensors=changed, base_tensors=digests, wrappers=wrappers,
                        load="from unlearn_tui.backends.export import apply_delta; "
                             "handle_or_model = apply_delta(base_model, OUT_DIR)")
            tracker.step(detail=f"{len(wrappers)} wrapper(s)")
        else:
            _save_full(handle, tmp)
            tracker.step(detail="save_pretrained")
            meta.update(tensors=touched, wrappers=[])
            tracker.step(detail="tokenizer")
        handle.tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        tracker.step(detail=EXPORT_FILE)
    return target


def _digest(t: Any) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                          ).hexdigest()


def _save_full(handle: ModelHandle, folder: Path) -> None:
    model = handle.model
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        from .model import _save_plain  # dequantised from GGUF: its config still says "quantized"

        _save_plain(model, folder)
        return
    model.save_pretrained(str(folder), safe_serialization=True)


def _save_wrappers(handle: ModelHandle, folder: Path, kinds: list[str]) -> list[dict]:
    out = []
    if not kinds:
        return out
    (folder / WRAPPER_DIR).mkdir()
    for i, (w, kind) in enumerate(zip(handle.wrappers, kinds)):
        if kind == "ike":
            name = f"{WRAPPER_DIR}/{i}-ike.json"
            (folder / name).write_text(json.dumps({"kind": "ike", "demos": [list(d) for d in w.demos], "k": w.k,
                                                   "min_similarity": w.min_similarity,
                                                   "instruction": w.instruction}, indent=2), encoding="utf-8")
        else:
            name = f"{WRAPPER_DIR}/{i}-{kind}.safetensors"
            w.save_state(str(folder / name), "export")
        out.append({"kind": kind, "file": name, "layer": getattr(w, "layer", None)})
    return out


def export_workbench(wb: Any, out: str | Path, *, delta: bool = False, force: bool = False,
                     session_name: str | None = None, protect: Iterable[Path] = ()) -> Path:
    """Export the Workbench's model as it is now (its kept edits: runs kept by the caller, step edits)."""
    handle = wb.load_model()
    s = wb.session
    info = {"session": session_name or (s.path.name if getattr(s, "path", None) else None),
            "model": s.model.name}
    return export(handle, out, list(wb.undo_stack), delta=delta, force=force, info=info, on_event=wb.on_event,
                  cancel=wb.cancel, finetuned=wb.finetune_info is not None, protect=protect)


# ---------------------------------------------------------------- loading a delta
def read_export(folder: str | Path) -> dict:
    """The export file of ``folder`` (UserError when it is not an unlearn-tui export)."""
    p = Path(folder).expanduser() / EXPORT_FILE
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p.parent} is not an unlearn-tui export (no {EXPORT_FILE})", "apply_delta") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p} ({exc}); expected an unlearn-tui export file", "apply_delta") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{p} has export format {info.get('format') if isinstance(info, dict) else '?'}; "
                        f"expected {FORMAT}", "apply_delta")
    return info


def apply_delta(model: Any, path: str | Path, tokenizer: Any = None) -> Any:
    """Lay the delta export at ``path`` onto ``model`` (a freshly loaded base model, or a ModelHandle).

    Refuses (UserError, one line) a model whose state dict is not the base
    the delta was exported from, or one that already has it applied.  The
    changed tensors are copied in place.  Without wrappers, returns ``model``;
    with WISE/GRACE/IKE state, returns a :class:`~backends.model.ModelHandle`
    (``model``'s own when one was given; else built with ``tokenizer``, by
    default the tokenizer saved in the export) carrying them: the wrappers work
    through the handle (IKE rewrites the prompts the handle formats).
    """
    import torch

    from .model import ModelHandle

    folder = Path(path).expanduser()
    info = read_export(folder)
    if info.get("kind") != "delta":
        raise UserError(f"{folder} is a full export; load it with AutoModelForCausalLM.from_pretrained",
                        "apply_delta")
    handle = model if isinstance(model, ModelHandle) else None
    m = handle.model if handle is not None else model
    tensors: dict = {}
    if info.get("tensors"):
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(folder / DELTA_FILE))
        except Exception as exc:
            raise UserError(f"cannot read {folder / DELTA_FILE} ({' '.join(str(exc).split())[:200]})",
                            "apply_delta") from None
    for n, t in tensors.items():
        try:
            p = m.get_parameter(n)
        except AttributeError:
            raise UserError(f'{folder} was exported for another model: this one has no parameter "{n}"; load '
                            f'the base model it was made from ({info.get("model")})', "apply_delta") from None
        if tuple(p.shape) != tuple(t.shape):
            raise UserError(f'{folder} was exported for another model: "{n}" has shape {list(p.shape)} here, '
                            f'{list(t.shape)} in the delta; load {info.get("model")}', "apply_delta")
    now = state_hash(m)
    if tensors and now == info.get("edited_state_hash") and now != info.get("base_state_hash"):
        raise UserError(f"this model already has the delta of {folder} applied", "apply_delta")
    if now != info.get("base_state_hash"):
        want = str(info.get("base_state_hash"))[:12]
        raise UserError(f"{folder} was exported for another model (base weights {want}, "
                        f"this model's {now[:12]}); load the base model it was made from ({info.get('model')}, "
                        f"{info.get('dtype')})", "apply_delta")
    wrappers = info.get("wrappers") or []
    if handle is not None and wrappers and handle.wrappers:
        raise UserError(f"the model already carries wrappers ({', '.join(w.name for w in handle.wrappers)}); "
                        f"apply the delta of {folder} to a freshly loaded base model", "apply_delta")
    with torch.no_grad():
        for n, t in tensors.items():
            m.get_parameter(n).copy_(t)
    if not wrappers:
        return model
    if handle is None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        handle = ModelHandle(m, tokenizer, name=str(info.get("model") or "model"),
                             device=str(next(m.parameters()).device), source=str(folder))
    for w in wrappers:
        handle.add_wrapper(_load_wrapper(handle, folder, w))
    return handle


def _load_wrapper(handle: ModelHandle, folder: Path, w: dict) -> Any:
    kind, path = w.get("kind"), folder / str(w.get("file"))
    where = "apply_delta"
    if kind == "ike":
        from .methods.ike import IKEWrapper

        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} ({exc})", where) from None
        return IKEWrapper([tuple(x) for x in d["demos"]], int(d["k"]), float(d["min_similarity"]),
                          str(d["instruction"]))
    if kind == "wise":
        from .editing.wise_memory import WiseMemory

        mem = WiseMemory.load_state(str(path), where)
        mem.check_compatible(handle, where)
        return mem
    if kind == "grace":
        from .editing.grace_codebook import GraceCodebook

        cb = GraceCodebook.load_state(str(path), where)
        if cb.hidden != handle.adapter.hidden_size:
            raise UserError(f"the exported codebook has keys of size {cb.hidden} but this model's hidden size is "
                            f"{handle.adapter.hidden_size}; it was exported for another model", where)
        return cb
    raise UserError(f"unknown wrapper kind {kind!r} in {folder / EXPORT_FILE}; expected wise, grace or ike", where)


__all__ = ["export", "export_workbench", "apply_delta", "check_out_dir", "read_export", "is_export", "EXPORT_FILE",
           "DELTA_FILE"]
