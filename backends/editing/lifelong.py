"""Shared machinery of the lifelong editors (WISE side memories, GRACE codebooks).

* :class:`SuffixRunner` trains an edit at layer ``L`` without re-running the
  frozen layers below it: the residual stream entering block ``L`` is computed
  once per batch (a forward that stops at block ``L``), and every optimisation
  step runs only blocks ``L..N-1``, the final norm and the unembedding of the
  positions that carry a loss.  It works by feeding the cached residual to the
  base model as ``inputs_embeds`` with the layer list temporarily cut to the
  suffix; the affine map the base model applies to ``inputs_embeds`` before
  block 0 (GPT-2 adds position embeddings, Gemma scales) is measured and
  inverted.  On first use it checks itself against a full forward pass and
  falls back to full forwards when the logits disagree, so an architecture it
  does not understand is slower, never wrong.
* :class:`CallTracker` is a model-level pre-hook that tells the inference hooks
  which tokens of the current call are padding and whether the call continues
  a cached generation (one new token per step) or starts new sequences.
* :func:`sequence_batch` builds right-padded ``prompt + target`` batches.
* :func:`save_tensors` / :func:`load_tensors`: safetensors plus a JSON header
  (no pickle) for persisting wrapper state; :func:`session_path` resolves a
  session's ``save_state`` / ``load_state`` against the session's folder and
  confines it there, and :func:`save_tensors` never creates folders, replaces
  only its own kind of state file and writes atomically (mkstemp, fsync,
  ``os.replace``).
* :data:`NEUTRAL_PROMPTS`: generic requests unrelated to any fact set, used as
  out-of-scope examples (WISE's routing loss) and to size GRACE's radius;
  :data:`NEUTRAL_QUESTIONS`: short factual questions in the usual question
  shapes, also out of scope for WISE (the reference uses NQ questions for
  this).  Both are written here, not drawn from the user's data (nor from the
  built-in fact sets), so retain scores stay honest; none asks a fact of TOFU's
  217-item factual set or of ``builtin:world-facts`` (``tests/test_wise_grace.py``
  checks: until stop 27 three did, "Who wrote the novel Don Quixote?", "Who was
  the first president of the United States?" and "What is the largest island in the
  world?").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..batching import pad_right
from ..compat import call_cache
from ..errors import UserError
from ..fileio import atomic_write
from .hooks import StopForward

if TYPE_CHECKING:
    from ..model import ModelHandle

NEUTRAL_PROMPTS = [
    "Write a short poem about the rain.",
    "How do I boil an egg?",
    "Give me three tips for sleeping better.",
    "What is 12 plus 30?",
    "Tell me a joke about computers.",
    "Translate 'thank you' into Spanish.",
    "Suggest a name for a pet goldfish.",
    "How should I start learning to play the guitar?",
    "Summarise the plot of a typical fairy tale in one sentence.",
    "What are some good habits for studying?",
    "Write a friendly greeting for a birthday card.",
    "Explain what a verb is to a child.",
    "What is the plural of the word mouse?",
    "How many legs does a spider have?",
    "What do bees make from nectar?",
    "What is the opposite of the word ancient?",
    "Which utensil is best for eating soup?",
    "What colour do you get by mixing blue and yellow?",
    "What is a synonym for happy?",
    "What sound does a cat make?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "What is the first letter of the English alphabet?",
]

# Short factual questions in the usual question shapes ("What is the capital of ...?", "Who wrote ...?"),
# written for this module and kept off the built-in fact sets.  WISE trains its router to leave them on
# the main memory, so that the side memory learns the edited facts rather than "a question was asked".
NEUTRAL_QUESTIONS = [
    "What is the capital of Portugal?",
    "What is the capital of Kenya?",
    "Who painted The Starry Night?",
    "Who wrote the novel Dracula?",
    "Who composed the Moonlight Sonata?",
    "What is the chemical symbol for potassium?",
    "What is the chemical symbol for tin?",
    "What is the currency of Switzerland?",
    "What is the currency of Mexico?",
    "What language is mainly spoken in Portugal?",
    "Which city is the capital of Argentina?",
    "In which country is the city of Marrakesh?",
    "In which city is the Sagrada Familia?",
    "On which continent is Peru located?",
    "Which planet has the most prominent rings?",
    "Which animal is known as the king of the jungle?",
    "How many players are there in a football team?",
    "How many strings does a violin have?",
    "What is the tallest animal in the world?",
    "What is the freezing point of water in Fahrenheit?",
    "Who composed the opera Carmen?",
    "Which metal is liquid at room temperature?",
    "What is the hardest natural substance?",
    "Which bird is a symbol of peace?",
    # the literary shapes of TOFU's real-authors half ("Who wrote 'X'?", "'X' is a novel by which
    # author?"), about works and authors it does not hold: without them every literary retain
    # question scored above the out-of-scope maximum and WISE routed 44% of the factual retain set
    # (benchmarks/RESULTS.md)
    "Who wrote 'The Three Musketeers'?",
    "Which author wrote 'Treasure Island'?",
    "Who is the author of 'Little Women'?",
    "Which author is known for the novel 'Robinson Crusoe'?",
    "'Madame Bovary' is a novel by which author?",
    "The novella 'The Metamorphosis' was written by which author?",
    "Which playwright wrote 'A Doll's House'?",
    "Who wrote the poem 'The Raven'?",
    "Which author created the character Huckleberry Finn?",
    "Who wrote the satirical novel 'Candide'?",
]


def end_ids(handle: ModelHandle) -> list[int]:
    eos = handle.model.generation_config.eos_token_id
    if eos is None:
        eos = handle.tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return [] if eos is None else [int(eos)]


@dataclass
class SeqBatch:
    ids: torch.Tensor          # [B, T] right padded
    mask: torch.Tensor         # [B, T]
    prompt_len: list[int]      # per row
    total_len: list[int]       # per row (prompt + target)

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, logit positions, gold tokens) of every target token."""
        rows, pos, gold = [], [], []
        for r, (p, n) in enumerate(zip(self.prompt_len, self.total_len)):
            for t in range(p, n):
                rows.append(r)
                pos.append(t - 1)
                gold.append(int(self.ids[r, t]))
        return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long), \
            torch.tensor(gold, dtype=torch.long)

    def prompt_mask(self) -> torch.Tensor:
        """[B, T] float mask of the prompt tokens."""
        m = torch.zeros(self.ids.shape, dtype=torch.float32)
        for r, p in enumerate(self.prompt_len):
            m[r, :p] = 1.0
        return m

    def from_prompt_end_mask(self) -> torch.Tensor:
        """[B, T] bool: the last prompt token and every token after it (up to the row's end)."""
        m = torch.zeros(self.ids.shape, dtype=torch.bool)
        for r, (p, n) in enumerate(zip(self.prompt_len, self.total_len)):
            m[r, p - 1:n] = True
        return m


def sequence_batch(handle: ModelHandle, prompts: Sequence[list[int]], targets: Sequence[list[int]]) -> SeqBatch:
    pad = handle.tokenizer.pad_token_id or 0
    seqs = [list(p) + list(t) for p, t in zip(prompts, targets)]
    ids, mask = pad_right(seqs, pad, handle.input_device)
    return SeqBatch(ids, mask, [len(p) for p in prompts], [len(s) for s in seqs])


# --------------------------------------------------------------------------- suffix runner


@dataclass
class Prepared:
    ids: torch.Tensor
    mask: torch.Tensor
    embeds: torch.Tensor | None   # what to feed as inputs_embeds to the cut model (None: full forwards)


class SuffixRunner:
    """Forward passes from block ``layer`` on, over a cached residual stream (see the module doc)."""

    def __init__(self, handle: ModelHandle, layer: int) -> None:
        self.handle = handle
        self.layer = layer
        parent_name, attr = handle.adapter.spec.layers.rsplit(".", 1)
        self.parent = handle.model.get_submodule(parent_name)
        self.attr = attr
        self.block = handle.adapter.block(layer)
        self.block0 = handle.adapter.block(0)
        self.fast: bool | None = None   # None until verified

    # the residual entering a block ------------------------------------------------------------
    def _block_input(self, block, **kwargs) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}

        def pre(mod, args, kw):
            h = args[0] if args else kw["hidden_states"]
            store["h"] = h.detach()
            raise StopForward   # the forward pass ends at the block's input

        hd = block.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                self.parent(use_cache=False, **kwargs)
        except StopForward:
            pass
        finally:
            hd.remove()
        return store["h"]

    def _affine(self, shape: tuple[int, int, int], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) with block0_input = scale * inputs_embeds + offset."""
        dt = self.handle.dtype
        zeros = torch.zeros(shape, dtype=dt, device=self.handle.input_device)
        off = self._block_input(self.block0, inputs_embeds=zeros, attention_mask=mask)
        ones = torch.ones(shape, dtype=dt, device=self.handle.input_device)
        scale = (self._block_input(self.block0, inputs_embeds=ones, attention_mask=mask) - off).mean()
        return scale, off

    def prepare(self, ids: torch.Tensor, mask: torch.Tensor) -> Prepared:
        if self.fast is False:
            return Prepared(ids, mask, None)
        h = self._block_input(self.block, input_ids=ids, attention_mask=mask)
        scale, off = self._affine(tuple(h.shape), mask)
        prep = Prepared(ids, mask, ((h - off.to(h.device)) / scale.to(h.device)).detach())
        if self.fast is None:
            self.fast = self._verify(prep)
            if not self.fast:
                prep.embeds = None
        return prep

    def _verify(self, prep: Prepared) -> bool:
        with torch.no_grad():
            full = self.handle.model(input_ids=prep.ids, attention_mask=prep.mask, use_cache=False).logits
            rows = torch.arange(prep.ids.shape[0])
            pos = prep.mask.sum(1).long().cpu() - 1
            mine = self.logits(prep, rows, pos)
            ref = full[rows.to(full.device), pos.to(full.device)].to(mine.device)
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        return bool(torch.isfinite(mine).all()) and float((mine - ref).abs().max()) <= tol

    def hidden(self, prep: Prepared) -> torch.Tensor:
        """Final hidden states (after the final norm) for every position."""
        if prep.embeds is None:
            out = self.parent(input_ids=prep.ids, attention_mask=prep.mask, use_cache=False)
            return out.last_hidden_state
        full = getattr(self.parent, self.attr)
        setattr(self.parent, self.attr, torch.nn.ModuleList(list(full)[self.layer:]))
        try:
            out = self.parent(inputs_embeds=prep.embeds, attention_mask=prep.mask, use_cache=False)
        finally:
            setattr(self.parent, self.attr, full)
        return out.last_hidden_state

    def logits(self, prep: Prepared, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.hidden(prep)
        sel = h[rows.to(h.device), pos.to(h.device)]
        return self.handle.adapter.unembed_logits(sel).float()

    def nll(self, prep: Prepared, rows: torch.Tensor, pos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        lg = self.logits(prep, rows, pos)
        return torch.nn.functional.cross_entropy(lg, gold.to(lg.device))


# --------------------------------------------------------------------------- call tracking


class CallTracker:
    """Model pre-hook: padding mask of the current call and whether it continues a cached generation."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.continuing = False
        self._handle = None

    def install(self, model: Any) -> None:
        self.remove()
        self._handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre(self, mod, args, kwargs) -> None:
        self.mask = kwargs.get("attention_mask")
        pkv = call_cache(kwargs)   # ``cache=`` in transformers 5.x, ``past_key_values=`` before
        past = 0
        if pkv is not None:
            try:
                past = int(pkv.get_seq_length())
            except Exception:  # legacy tuples
                past = 1
        self.continuing = past > 0

    def valid(self, batch: int, width: int, device: Any) -> torch.Tensor:
        """[B, T] bool mask of the real (non-padding) tokens of the current call."""
        m = self.mask
        if m is None or m.dim() != 2 or m.shape[0] != batch or m.shape[1] < width:
            return torch.ones((batch, width), dtype=torch.bool, device=device)
        return m[:, -width:].to(device=device).bool()


# --------------------------------------------------------------------------- helpers


class HookedWrapper:
    """Install/remove for a wrapper that hooks one module's output and tracks generation calls.

    Subclasses set ``self._hook = None`` and ``self._tracker = CallTracker()``
    and name the hooked module in :meth:`hook_module`; ``_forward`` is the hook.
    """

    _hook: Any
    _tracker: CallTracker

    def hook_module(self, handle: ModelHandle) -> Any:
        raise NotImplementedError

    def install(self, handle: ModelHandle) -> None:
        self.remove(handle)
        self._hook = self.hook_module(handle).register_forward_hook(self._forward)
        self._tracker.install(handle.model)

    def remove(self, handle: ModelHandle) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._tracker.remove()


def weight_apply(x: torch.Tensor, w: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` through a projection weight stored as ``(out, in)`` (Linear) or ``(in, out)`` (Conv1D)."""
    return torch.nn.functional.linear(x, w) if layout == "out_in" else x @ w


ALLOW_OUTSIDE_ENV = "UNLEARN_TUI_ALLOW_OUTSIDE"   # "1": paths in a session may leave the session's folder


def outside_allowed(flag: bool = False) -> bool:
    """The explicit opt-in for paths outside the session's folder: a param, or ``UNLEARN_TUI_ALLOW_OUTSIDE=1``."""
    import os

    return bool(flag) or os.environ.get(ALLOW_OUTSIDE_ENV, "").strip() == "1"


def session_path(value: str | Path, base_dir: str | Path | None, where: str, allow_outside: bool = False,
                 opt_in: str = f"set allow_outside = true, or {ALLOW_OUTSIDE_ENV}=1") -> Path:
    """A file path from a session, resolved against the session's folder and confined to it.

    ``value`` (``~`` expanded) is taken relative to ``base_dir`` and resolved
    (every symlink followed).  When the result lies outside ``base_dir`` --
    through ``..``, an absolute path or a symlink -- it is a one-line
    :class:`UserError` at ``where``, unless the user opted in
    (:func:`outside_allowed`; ``opt_in`` says how, in the message).  Without a session folder (``base_dir`` None:
    the engine driven from Python) the path is relative to the current
    directory and not confined.  Returns the resolved path.
    """
    try:
        p = Path(value).expanduser()
        if base_dir is None:
            return p.resolve()
        base = Path(base_dir).expanduser().resolve()
        real = (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError, ValueError) as exc:   # a symlink loop, an unknown ~user, a NUL byte
        raise UserError(f'cannot resolve the path "{value}" ({exc}); expected a file path inside the session '
                        f'folder', where) from None
    if not outside_allowed(allow_outside) and real != base and base not in real.parents:
        raise UserError(f'"{value}" resolves to {real}, outside the session folder {base}; expected a path inside '
                        f'it (or {opt_in})', where)
    return real


def state_file_kind(path: str | Path) -> str | None:
    """The ``kind`` in the unlearn-tui header of a safetensors state file; None for any other file.

    Reads only the safetensors header (8-byte length + JSON), never the tensors.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if not 2 <= n <= 100_000_000:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
        meta = json.loads((header.get("__metadata__") or {}).get("unlearn_tui") or "null")
        kind = meta.get("kind") if isinstance(meta, dict) else None
        return kind if isinstance(kind, str) else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def check_state_target(path: str | Path, kind: str, where: str, overwrite: bool = False) -> None:
    """Fail (UserError at ``where``) unless a state file of ``kind`` may be written at ``path``.

    The folder must exist (it is never created); an existing file is replaced
    only when it is a state file of the same ``kind`` (its header says so)
    or ``overwrite`` is set; a folder is never replaced.
    """
    p = Path(path)
    try:
        parent_ok, is_dir, exists = p.parent.is_dir(), p.is_dir(), p.exists()
    except OSError as exc:
        raise UserError(f"cannot inspect {p} ({exc.strerror or exc}); expected a writable file path", where) from None
    if not parent_ok:
        raise UserError(f"the folder {p.parent} does not exist; expected an existing folder (state files never "
                        f"create folders)", where)
    if is_dir:
        raise UserError(f"{p} is a folder; expected a .safetensors file name", where)
    if exists and not overwrite:
        found = state_file_kind(p) if p.is_file() else None   # never open a pipe or a device
        if found != kind:
            what = f"a {found} state file" if found else "not an unlearn-tui state file"
            raise UserError(f"{p} exists and is {what}; expected a new file name or a {kind} state file to "
                            f"replace (or set overwrite = true)", where)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, where: str = "params.save_state",
                 overwrite: bool = False) -> None:
    """One safetensors file; ``meta`` (JSON-able, with its ``kind``) goes into the header.

    The target is checked first (:func:`check_state_target`), then written
    with :func:`backends.fileio.atomic_write` (mode 0600); on any error the
    target is untouched and no temp file is left.
    """
    from safetensors.torch import save

    p = Path(path).expanduser()
    check_state_target(p, str(meta.get("kind", "")), where, overwrite)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():   # safetensors refuses tensors sharing storage: copy the repeats
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    data = save(out, metadata={"unlearn_tui": json.dumps(meta)})
    try:   # the one atomic writer: mkstemp in the folder, fsync, replace, fsync the folder, no temp left
        atomic_write(p, data, mode=0o600)
    except OSError as exc:
        raise UserError(f"could not write {p} ({exc.strerror or exc}); expected a writable file in an existing "
                        f"folder", where) from None


def load_tensors(path: str | Path, where: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"state file not found: {p}", where)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("unlearn_tui", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{p} is not a readable state file ({exc})", where) from None
    return tensors, meta
