"""Fine-tune first: teach the base model the facts before the baseline (``[finetune]``).

The paper's fine-tuned-knowledge setting (PISTOL: fine-tune the base model on
the whole data set until ROUGE-1 = 1.0 on it, then unlearn some items).  A
model that never knew a fact has nothing to forget; this step makes it know
them.  The settings are :class:`backends.spec.FinetuneConfig` (its docstring
gives the defaults and why).

Training
    Examples are question -> answer pairs (``training.make_example``: the
    handle's prompt, chat template and all, then the answer tokens), followed
    by the end-of-sequence token the model's generation stops at, so the
    fine-tuned model answers and stops.  The items are ordered by id (and a
    repeated id is used once), so the same set trains the same way however it
    was selected.  The loss is the mean next-token negative log-likelihood
    over the answer tokens of a mini-batch (prompt tokens are never
    trained): ``L = -(1/N) sum_t log p(a_t | prompt, a_<t)``.  AdamW (no
    weight decay: the point is to memorise), a linear warm-up over the first
    epoch's steps (at most :data:`WARMUP_STEPS_MAX`) and then a constant rate,
    gradient clipping at :data:`MAX_GRAD_NORM`, shuffled mini-batches from a
    generator seeded with ``seed``, the global RNG forked (LoRA's
    initialisation), the model kept in eval mode (no dropout): a fine-tune is
    deterministic on CPU for a given seed and thread count.  A NaN/inf loss or
    gradient raises :class:`NonFiniteError`.
    ``tuning = "full"`` trains the weights of ``scope`` (``"all"``: every
    parameter, tied embeddings once; ``"blocks"``: every weight of the
    transformer blocks; ``"mlp"``: their MLPs); ``"lora"``: peft LoRA adapters
    (rank ``lora_rank``, scale 2) on the Linear/Conv1D modules of every block
    (their MLPs with ``scope = "mlp"``), merged into the base weights after
    training (``training.lora_adapters``).

Stop
    After every epoch the model answers every training question greedily
    (``generation.generate``, up to the longest answer plus
    :data:`CHECK_MARGIN` tokens: recall needs the answer, not what follows it)
    and the mean ROUGE-1 recall of the gold answers (:func:`metrics.rouge1_recall`)
    is compared with ``until_rouge1``: training stops once it is reached (0:
    every epoch runs, and only the last is checked).  Not reaching it is a
    warning, not an error; the info says whether it was reached and the last
    ROUGE-1.

Progress, cancel, rollback
    One :class:`~backends.events.Tracker`, stage :data:`STAGE`, counts the
    optimisation steps of ``epochs`` epochs (the ETA includes the checks); the
    cancel token is checked at every step and every generated batch.  The
    whole step runs inside :meth:`ModelHandle.transaction` over the weights it
    changes, so a failure or a cancel restores them bit for bit.

Cache
    The weights it changed are stored as ``cache_dir()/finetuned/<base
    fingerprint>/<key>.safetensors`` with ``<key>.json`` beside it (settings,
    ROUGE-1, epochs, seconds; written last, so a half-written entry is a miss),
    both written atomically (:mod:`backends.fileio`).  ``key`` hashes
    :data:`VERSION`, the base model's fingerprint and dtype, the settings that
    change training (everything of ``FinetuneConfig`` but ``data``, with
    ``lr`` resolved) and the exact token ids of every example, so replays and
    sweeps reuse a fine-tune and any change of model, data or setting misses.
    On a hit the weights are loaded without training.  A cache that cannot be
    read or written costs a fine-tune, never the run.

Resume
    A fine-tune that stops before its end (cancelled, killed, a failure)
    keeps its last finished epoch: after every epoch that does not reach the
    bar, the trained tensors, AdamW's state, the scheduler's position, the
    shuffling generator's state, the step count and the history are written
    as ``<key>.partial.safetensors`` + ``<key>.partial.json`` beside the cache
    entries, under the *trajectory* key (:func:`cache_key` without the epoch
    cap: the learning rate does not depend on it), written atomically, the
    JSON last and naming the epoch the tensors hold.  The next :func:`apply`
    with the same model, data and settings and a cap above that epoch starts
    from there: the weights it ends with, the steps and the history are the
    ones an uninterrupted run gives (bit for bit on CPU with the same thread
    count; a test checks it).  So a fine-tune cut short resumes, and one that
    ended below the bar continues when the cap is raised (``epochs``).  The
    partial files are removed once the bar is reached.  Without the cache
    (``use_cache=False``) nothing is kept.

Identity
    Afterwards the handle's fingerprint is derived from the base fingerprint
    and the key (:meth:`ModelHandle.set_fingerprint`), so every cache keyed by
    it (known scores, covariance statistics, self-sampled corpora) belongs to
    the fine-tuned model; ``handle.finetune`` holds the :class:`FinetuneInfo`.

:func:`apply` changes a handle in place (the Workbench does that before the
baseline); :func:`finetuned_model` returns a fine-tuned copy and leaves the
handle alone (a retain-only model beside the one being unlearned).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NonFiniteError, UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .paths import cache_dir
from .spec import FinetuneConfig

if TYPE_CHECKING:
    from .metrics import EvalSettings
    from .model import ModelHandle
    from .training import Example

VERSION = 1            # bump when training or the check changes what a key stands for
STAGE = "finetune"
WARMUP_STEPS_MAX = 50  # linear warm-up over the first epoch, at most this many steps
MAX_GRAD_NORM = 1.0
CHECK_MARGIN = 8       # tokens generated beyond the longest answer in the ROUGE-1 check
LORA_SCALE = 2.0       # lora_alpha = LORA_SCALE * lora_rank
CHECK_BATCH = 16       # generation batch of the check when no evaluation settings are given


@dataclass(frozen=True)
class FinetuneInfo:
    """What a fine-tune did (or what the cached one it loaded had done)."""

    key: str
    base_fingerprint: str
    fingerprint: str       # the fine-tuned model's (derived) fingerprint
    data: str              # the ``[finetune] data`` it was asked for
    items: int             # training pairs
    cached: bool           # loaded from the cache, no training now
    rouge1: float | None   # mean ROUGE-1 recall after the last epoch
    reached: bool          # rouge1 >= until_rouge1 (True when the bar is off)
    until_rouge1: float
    epochs: int            # epochs trained
    steps: int
    seconds: float         # training time (of the original fine-tune when cached)
    tuning: str
    lr: float
    history: tuple = ()    # per epoch: {"epoch", "loss", "rouge1"}
    load_seconds: float = 0.0   # time to load the cached weights (cached only)

    def to_json(self) -> dict[str, Any]:
        """The ``"finetune"`` block of a replay's result."""
        return {"cached": self.cached, "rouge1": self.rouge1, "reached": self.reached,
                "until_rouge1": self.until_rouge1, "epochs": self.epochs, "steps": self.steps,
                "seconds": round(self.seconds, 3), "data": self.data, "items": self.items, "tuning": self.tuning,
                "lr": self.lr, "key": self.key, "fingerprint": self.fingerprint,
                "base_fingerprint": self.base_fingerprint, "history": list(self.history)}


@dataclass
class _Trained:
    rouge1: float | None = None
    reached: bool = False
    epochs: int = 0
    steps: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0          # the epoch a partial fine-tune was resumed after (0: from the start)


@dataclass
class _Partial:
    """A finished epoch of an unfinished fine-tune (see "Resume" in the module doc)."""

    epoch: int
    steps: int
    history: list[dict]
    rouge1: float | None
    params: list[Any]              # the trained tensors, in training order
    optimizer: dict                # AdamW's state_dict
    scheduler: dict                # the LambdaLR's state_dict without its lambda
    generator: Any                 # the shuffling generator's state (uint8 tensor)


# --------------------------------------------------------------------------- data and key


def training_items(items: Sequence[Any]) -> list[Any]:
    """The training set as it trains: ordered by id, each id once (the first item with it)."""
    seen: dict[str, Any] = {}
    for it in items:
        seen.setdefault(str(it.id), it)
    return [seen[k] for k in sorted(seen)]


def _stop_id(handle: ModelHandle) -> int | None:
    """The token the model's generation stops at (generation config first, then the tokenizer)."""
    eos = getattr(handle.model.generation_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos if eos is not None else handle.tokenizer.eos_token_id


def examples(handle: ModelHandle, items: Sequence[Any]) -> list[Example]:
    """One example per item (in the given order): prompt ids, answer ids + the stop token."""
    from . import training

    stop = _stop_id(handle)
    out = []
    for it in items:
        ex = training.make_example(handle, it.question, it.answer)
        if stop is not None:
            ex = training.Example(ex.prompt, [*ex.completion, int(stop)])
        out.append(ex)
    return out


def _settings(cfg: FinetuneConfig) -> dict[str, Any]:
    """The settings that change what training produces (``data`` is in the examples; lr resolved)."""
    s = dataclasses.asdict(cfg)
    s.pop("data")
    s["lr"] = cfg.resolved_lr()
    if cfg.tuning != "lora":
        s.pop("lora_rank")
    return s


def cache_key(handle: ModelHandle, exs: Sequence[Example], cfg: FinetuneConfig,
              base_fingerprint: str | None = None, trajectory: bool = False) -> str:
    """The fine-tune's key: VERSION, base fingerprint and dtype, settings, every example's token ids.

    ``trajectory``: the key without the epoch cap, which names the training path (the learning rate
    does not depend on the cap), so a partial fine-tune continues under a higher cap ("Resume")."""
    settings = _settings(cfg)
    if trajectory:
        settings.pop("epochs")
    h = hashlib.sha256()
    h.update(json.dumps({"v": VERSION, "base": base_fingerprint or handle.fingerprint, "dtype": str(handle.dtype),
                         "settings": settings, "check_margin": CHECK_MARGIN,
                         **({"trajectory": True} if trajectory else {})}, sort_keys=True).encode())
    for e in exs:
        h.update(json.dumps([list(e.prompt), list(e.completion)]).encode())
    return h.hexdigest()[:24]


def derived_fingerprint(base_fingerprint: str, key: str) -> str:
    """The fine-tuned model's fingerprint: ``sha256(base | finetune-vN | key)``, 16 hex digits."""
    return hashlib.sha256(f"{base_fingerprint}|finetune-v{VERSION}|{key}".encode()).hexdigest()[:16]


def cache_root() -> Path:
    return cache_dir() / "finetuned"


def cache_files(base_fingerprint: str, key: str) -> tuple[Path, Path]:
    """(weights ``.safetensors``, meta ``.json``) of one fine-tune."""
    folder = cache_root() / base_fingerprint
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def partial_files(base_fingerprint: str, key: str) -> tuple[Path, Path]:
    """(tensors, note) of one fine-tune's last finished epoch while it is unfinished ("Resume")."""
    folder = cache_root() / base_fingerprint
    return folder / f"{key}.partial.safetensors", folder / f"{key}.partial.json"


# --------------------------------------------------------------------------- which weights


def _layers(handle: ModelHandle) -> list[int]:
    return list(range(handle.adapter.n_layers))


def changed_names(handle: ModelHandle, cfg: FinetuneConfig) -> list[str]:
    """The parameters the fine-tune changes (and the cache stores), in model order.

    Full: those of ``scope``; LoRA: the base weights of the adapted modules (the merge writes there).
    """
    from . import training

    if cfg.tuning == "lora":
        mods = set(training.lora_module_names(handle, _layers(handle), "mlp" if cfg.scope == "mlp" else "block"))
        return [n for n, _ in handle.model.named_parameters() if n.endswith(".weight") and n[:-7] in mods]
    if cfg.scope == "all":
        return [n for n, _ in handle.model.named_parameters()]
    return training.trainable_names(handle, _layers(handle), "mlp" if cfg.scope == "mlp" else "block")


# --------------------------------------------------------------------------- the check


def check_rouge1(handle: ModelHandle, items: Sequence[Any], exs: Sequence[Example], batch_size: int = CHECK_BATCH,
                 cancel: CancelToken | None = None) -> float:
    """Mean ROUGE-1 recall of the gold answers in the model's greedy answers (see the module doc)."""
    from .generation import generate
    from .metrics import rouge1_recall

    if not items:
        return 0.0
    budget = max(len(e.completion) for e in exs) + CHECK_MARGIN
    on_batch = (lambda _n: cancel.check()) if cancel is not None else None
    gens = generate(handle, [list(e.prompt) for e in exs], budget, batch_size, on_batch=on_batch)
    return sum(rouge1_recall(it.answer, g) for it, g in zip(items, gens)) / len(items)


# --------------------------------------------------------------------------- training


def _train(handle: ModelHandle, items: Sequence[Any], exs: Sequence[Example], cfg: FinetuneConfig, params: list,
           tracker: Tracker, on_event: EventCallback, cancel: CancelToken, check_batch: int,
           resume: _Partial | None = None, save_point: Any = None) -> _Trained:
    """The loop of the module doc on ``params``; returns what it did.  ``resume`` continues a partial
    fine-tune; ``save_point(partial)`` is called after every epoch that does not reach the bar."""
    import torch

    from . import training

    model = handle.model
    device = next(model.parameters()).device
    pad = handle.tokenizer.pad_token_id
    n = len(exs)
    bs = max(1, cfg.batch_size)
    per_epoch = math.ceil(n / bs)
    warmup = max(1, min(per_epoch, WARMUP_STEPS_MAX))
    opt = torch.optim.AdamW(params, lr=cfg.resolved_lr(), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    res = _Trained()
    first = 1
    if resume is not None and (len(resume.params) != len(params) or any(
            tuple(v.shape) != tuple(p.shape) for p, v in zip(params, resume.params))):
        on_event(Log("finetune: the kept partial fine-tune does not fit these weights; training from the start",
                     "warning"))
        resume = None
    if resume is not None:
        with torch.no_grad():
            for p, v in zip(params, resume.params):
                p.copy_(v.to(device=p.device, dtype=p.dtype))
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict({**resume.scheduler, "lr_lambdas": [None] * len(sched.lr_lambdas)})
        gen.set_state(resume.generator)
        res.steps, res.epochs, res.rouge1 = resume.steps, resume.epoch, resume.rouge1
        res.history, res.resumed_from = list(resume.history), resume.epoch
        first = resume.epoch + 1
        tracker.advance(resume.steps, detail=f"resumed after epoch {resume.epoch}/{cfg.epochs}")
    try:
        with torch.enable_grad():
            for epoch in range(first, cfg.epochs + 1):
                order = torch.randperm(n, generator=gen).tolist()
                losses = []
                for b in range(per_epoch):
                    batch = training.pack([exs[i] for i in order[b * bs:(b + 1) * bs]], pad, device)
                    loss = -training.token_logprobs(training.completion_logits(model, batch), batch).mean()
                    lv = float(loss.detach())
                    if not math.isfinite(lv):
                        raise NonFiniteError(f"finetune: the loss became {lv} at step {res.steps + 1}; the "
                                             "weights were restored (lower [finetune] lr)")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gn = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
                    if not math.isfinite(gn):
                        raise NonFiniteError(f"finetune: a gradient became non-finite at step {res.steps + 1}; "
                                             "the weights were restored (lower [finetune] lr)")
                    opt.step()
                    sched.step()
                    res.steps += 1
                    losses.append(lv)
                    tracker.step(loss=lv, detail=f"epoch {epoch}/{cfg.epochs} loss {lv:.3g}")
                res.epochs = epoch
                if cfg.until_rouge1 <= 0 and epoch < cfg.epochs:   # no bar: only the last epoch is checked
                    res.history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "rouge1": None})
                else:
                    r1 = check_rouge1(handle, items, exs, check_batch, cancel)
                    res.rouge1 = r1
                    res.history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "rouge1": r1})
                    on_event(Log(f"finetune: epoch {epoch}/{cfg.epochs}: ROUGE-1 {r1:.3f} on {n} items "
                                 f"(mean loss {res.history[-1]['loss']:.3g})"))
                    if cfg.until_rouge1 > 0 and r1 >= cfg.until_rouge1:
                        res.reached = True
                        break
                if save_point is not None:   # not reached (a reached bar broke out above): kept for a resume
                    sd = dict(sched.state_dict())
                    sd.pop("lr_lambdas", None)
                    save_point(_Partial(epoch, res.steps, list(res.history), res.rouge1,
                                        [p.detach() for p in params], opt.state_dict(), sd, gen.get_state()))
        if cfg.until_rouge1 <= 0:
            res.reached = True
    finally:
        for p in params:
            p.grad = None
    return res


def _run_training(handle: ModelHandle, items: Sequence[Any], exs: Sequence[Example], cfg: FinetuneConfig,
                  names: list[str], on_event: EventCallback, cancel: CancelToken, check_batch: int,
                  resume: _Partial | None = None, save_point: Any = None) -> _Trained:
    from . import training

    steps = math.ceil(len(exs) / max(1, cfg.batch_size)) * cfg.epochs
    tracker = Tracker(on_event, cancel, STAGE, steps,
                      detail=f"{len(exs)} items, {cfg.tuning}, lr {cfg.resolved_lr():g}, until ROUGE-1 "
                             f"{cfg.until_rouge1:g} or {cfg.epochs} epochs")
    with training.seeded(int(cfg.seed)):
        if cfg.tuning == "lora":
            mods = training.lora_module_names(handle, _layers(handle), "mlp" if cfg.scope == "mlp" else "block")
            if not mods:
                raise UserError("the model's blocks have no Linear modules for LoRA", "finetune.tuning")
            with training.lora_adapters(handle, mods, cfg.lora_rank, LORA_SCALE * cfg.lora_rank) as lora:
                res = _train(handle, items, exs, cfg, lora["params"], tracker, on_event, cancel, check_batch,
                             resume, save_point)
                lora["merge"] = True
            return res
        params = [handle.parameter(n) for n in names]
        try:
            for p in params:
                p.requires_grad_(True)
            return _train(handle, items, exs, cfg, params, tracker, on_event, cancel, check_batch, resume, save_point)
        finally:
            for p in params:
                p.requires_grad_(False)


# --------------------------------------------------------------------------- cache


def _read_cache(handle: ModelHandle, base: str, key: str, names: list[str],
                on_event: EventCallback) -> tuple[dict, dict] | None:
    """(tensors, meta) of a complete, matching cache entry, else None (a broken one is a warning)."""
    weights, meta_path = cache_files(base, key)
    if not meta_path.is_file() or not weights.is_file():
        return None
    try:
        from safetensors.torch import load_file

        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("version") != VERSION or meta.get("key") != key:
            return None
        tensors = load_file(str(weights), device="cpu")
        if set(tensors) != set(names):
            raise ValueError(f"it holds {len(tensors)} tensors, the model has {len(names)} to load")
        for n in names:
            p = handle.parameter(n)
            if tuple(tensors[n].shape) != tuple(p.shape) or tensors[n].dtype != p.dtype:
                raise ValueError(f'"{n}" is {tuple(tensors[n].shape)} {tensors[n].dtype}, the model\'s '
                                 f"{tuple(p.shape)} {p.dtype}")
        return tensors, meta
    except Exception as exc:  # a broken cache is trained again, never fatal
        on_event(Log(f"finetune: cached weights {weights.name} unreadable ({exc}); training again", "warning"))
        return None


def _write_cache(handle: ModelHandle, base: str, key: str, names: list[str], meta: dict,
                 on_event: EventCallback) -> None:
    from .fileio import atomic_write, save_safetensors

    weights, meta_path = cache_files(base, key)
    try:
        weights.parent.mkdir(parents=True, exist_ok=True)
        tensors = {n: handle.parameter(n).detach().to("cpu", copy=True).contiguous() for n in names}
        save_safetensors(weights, tensors, {"key": key, "version": str(VERSION)})
        atomic_write(meta_path, json.dumps(meta, indent=1))
    except Exception as exc:  # a cache we cannot write costs the next run a fine-tune, never this one
        on_event(Log(f"finetune: could not cache the fine-tuned weights ({exc}); the next run trains again",
                     "warning"))


def _write_partial(base: str, key: str, pt: _Partial, note: dict, on_event: EventCallback) -> None:
    """Keep one finished epoch (tensors first, the note naming their epoch last); never fails the run."""
    from .fileio import atomic_write, save_safetensors

    tensors_path, note_path = partial_files(base, key)
    try:
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Any] = {f"param.{i}": v.to("cpu", copy=True).contiguous() for i, v in enumerate(pt.params)}
        scalars: dict[str, dict] = {}
        for idx, st in pt.optimizer["state"].items():
            for k, v in st.items():
                if hasattr(v, "shape"):
                    tensors[f"opt.{idx}.{k}"] = v.to("cpu", copy=True).contiguous()
                else:
                    scalars.setdefault(str(idx), {})[k] = v
        tensors["generator"] = pt.generator.clone()
        save_safetensors(tensors_path, tensors, {"key": key, "version": str(VERSION), "epoch": str(pt.epoch)})
        atomic_write(note_path, json.dumps({
            **note, "version": VERSION, "key": key, "partial": True, "epoch": pt.epoch, "epochs": pt.epoch,
            "steps": pt.steps, "history": pt.history, "rouge1": pt.rouge1, "params": len(pt.params),
            "optimizer_groups": pt.optimizer["param_groups"], "optimizer_scalars": scalars,
            "scheduler": pt.scheduler, "created": time.time()}, indent=1))
    except Exception as exc:  # keeping the epoch is a convenience: a failure only means no resume
        on_event(Log(f"finetune: could not keep epoch {pt.epoch} for a resume ({exc})", "warning"))


def _read_partial(base: str, key: str, on_event: EventCallback) -> tuple[_Partial, dict] | None:
    """The kept epoch of an unfinished fine-tune with this key, with its note; None when there is none
    (or it does not hold together: a warning, and training starts from the beginning)."""
    tensors_path, note_path = partial_files(base, key)
    if not note_path.is_file() or not tensors_path.is_file():
        return None
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        note = json.loads(note_path.read_text(encoding="utf-8"))
        if note.get("version") != VERSION or note.get("key") != key or not note.get("partial"):
            return None
        with safe_open(str(tensors_path), "pt") as f:
            md = f.metadata() or {}
        if md.get("key") != key or md.get("epoch") != str(note["epoch"]):
            raise ValueError("its tensors and its note name different epochs")
        t = load_file(str(tensors_path), device="cpu")
        n = int(note["params"])
        state: dict[int, dict] = {}
        for name, v in t.items():
            if name.startswith("opt."):
                _, idx, k = name.split(".", 2)
                state.setdefault(int(idx), {})[k] = v
        for idx, extra in (note.get("optimizer_scalars") or {}).items():
            state.setdefault(int(idx), {}).update(extra)
        pt = _Partial(int(note["epoch"]), int(note["steps"]), list(note["history"]), note.get("rouge1"),
                      [t[f"param.{i}"] for i in range(n)],
                      {"state": state, "param_groups": note["optimizer_groups"]}, dict(note["scheduler"]),
                      t["generator"])
        return pt, note
    except Exception as exc:  # a broken partial costs the epochs it held, never the run
        on_event(Log(f"finetune: the kept partial fine-tune {tensors_path.name} is unreadable ({exc}); training "
                     "from the start", "warning"))
        return None


def _remove_partial(base: str, key: str) -> None:
    for path in partial_files(base, key):
        try:
            path.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- entry points


def apply(handle: ModelHandle, items: Sequence[Any], cfg: FinetuneConfig, settings: EvalSettings | None = None,
          on_event: EventCallback = ignore, cancel: CancelToken | None = None, use_cache: bool = True) -> FinetuneInfo:
    """Fine-tune ``handle`` in place on ``items`` (or load the cached fine-tune); see the module doc.

    ``settings`` gives the check's generation batch size.  Raises UserError
    for an empty training set or a handle that is already fine-tuned or has
    wrappers installed; Cancelled / NonFiniteError after restoring the weights.
    """
    cancel = cancel or CancelToken()
    if getattr(handle, "finetune", None) is not None:
        raise UserError("the model is already fine-tuned; fine-tune the base model", "finetune")
    if handle.wrappers:
        raise UserError("fine-tune the bare model: inference-time wrappers are installed", "finetune")
    train = training_items(items)
    if not train:
        raise UserError(f'nothing to fine-tune on: [finetune] data = "{cfg.data}" selects no items; select forget '
                        'or retain items, or name a data file', "finetune.data")
    exs = examples(handle, train)
    base = handle.fingerprint
    key = cache_key(handle, exs, cfg, base)
    names = changed_names(handle, cfg)
    fingerprint = derived_fingerprint(base, key)
    check_batch = settings.batch_size if settings is not None else CHECK_BATCH

    hit = _read_cache(handle, base, key, names, on_event) if use_cache else None
    if hit is not None:
        import torch

        tensors, meta = hit
        t0 = time.perf_counter()
        tracker = Tracker(on_event, cancel, STAGE, 1, detail=f"cached fine-tune {key} ({len(train)} items)")
        with handle.transaction(names), torch.no_grad():
            for n in names:
                handle.parameter(n).copy_(tensors[n])
        info = FinetuneInfo(key, base, fingerprint, cfg.data, len(train), True, meta.get("rouge1"),
                            bool(meta.get("reached")), float(cfg.until_rouge1), int(meta.get("epochs", 0)),
                            int(meta.get("steps", 0)), float(meta.get("seconds", 0.0)), cfg.tuning,
                            cfg.resolved_lr(), tuple(meta.get("history", ())), time.perf_counter() - t0)
        tracker.step(detail=f"loaded (ROUGE-1 {_fmt(info.rouge1)} after {info.epochs} epochs)")
        on_event(Log(f"finetune: loaded the cached fine-tune {key} (ROUGE-1 {_fmt(info.rouge1)} after "
                     f"{info.epochs} epochs; no training)"))
    else:
        t0 = time.perf_counter()
        path_key = cache_key(handle, exs, cfg, base, trajectory=True)
        kept = _read_partial(base, path_key, on_event) if use_cache else None
        if kept is not None and kept[0].epoch >= cfg.epochs:   # it went as far as this cap allows, or further
            kept = None
        resume, before = (kept[0], float(kept[1].get("seconds", 0.0))) if kept else (None, 0.0)
        if resume is not None:
            on_event(Log(f"finetune: resuming {key} after epoch {resume.epoch}/{cfg.epochs} (ROUGE-1 "
                         f"{_fmt(resume.rouge1)}), kept by an unfinished run"))
        note = {"model": handle.name, "base_fingerprint": base, "data": cfg.data, "items": len(train),
                "tuning": cfg.tuning, "settings": _settings(cfg)}
        save_point = (lambda pt: _write_partial(base, path_key, pt,
                                                {**note, "seconds": before + time.perf_counter() - t0},
                                                on_event)) if use_cache else None
        with handle.transaction(names):
            res = _run_training(handle, train, exs, cfg, names, on_event, cancel, check_batch, resume, save_point)
        seconds = before + time.perf_counter() - t0
        info = FinetuneInfo(key, base, fingerprint, cfg.data, len(train), False, res.rouge1, res.reached,
                            float(cfg.until_rouge1), res.epochs, res.steps, seconds, cfg.tuning, cfg.resolved_lr(),
                            tuple(res.history))
        if use_cache:
            meta = {"version": VERSION, "key": key, "model": handle.name, "base_fingerprint": base,
                    "fingerprint": fingerprint, "dtype": str(handle.dtype), "settings": _settings(cfg),
                    "data": cfg.data, "items": len(train), "rouge1": res.rouge1, "reached": res.reached,
                    "epochs": res.epochs, "steps": res.steps, "seconds": seconds, "history": res.history,
                    "resumed_from": res.resumed_from,
                    "parameters": len(names), "created": time.time()}
            _write_cache(handle, base, key, names, meta, on_event)
            if res.reached:   # a bar not reached keeps its last epoch: a higher cap continues from there
                _remove_partial(base, path_key)
    if not info.reached:
        on_event(Log(f"finetune: ROUGE-1 {_fmt(info.rouge1)} after {info.epochs} epochs did not reach "
                     f"until_rouge1 = {cfg.until_rouge1:g}; the baseline starts from this model (raise [finetune] "
                     "epochs or lr)", "warning"))
    elif not info.cached:
        on_event(Log(f"finetune: ROUGE-1 {_fmt(info.rouge1)} on {len(train)} items after {info.epochs} epochs "
                     f"({info.seconds:.1f} s)"))
    handle.set_fingerprint(fingerprint)
    handle.finetune = info
    return info


def matches(handle: ModelHandle, items: Sequence[Any], cfg: FinetuneConfig) -> bool:
    """Whether ``handle`` carries exactly the fine-tune ``apply(base, items, cfg)`` would make."""
    info = getattr(handle, "finetune", None)
    if info is None:
        return False
    return info.key == cache_key(handle, examples(handle, training_items(items)), cfg, info.base_fingerprint)


def restore(handle: ModelHandle, base_weights: dict[str, Any]) -> None:
    """Undo :func:`apply` on ``handle`` from a copy of the weights it changed, taken before it
    (``{name: tensor}``, any device): the weights, the fingerprint and ``handle.finetune``."""
    import torch

    info = getattr(handle, "finetune", None)
    with torch.no_grad():
        for n, t in base_weights.items():
            handle.parameter(n).copy_(t)
    if info is not None:
        handle.set_fingerprint(info.base_fingerprint)
    handle.finetune = None


def finetuned_model(handle: ModelHandle, items: Sequence[Any], cfg: FinetuneConfig,
                    settings: EvalSettings | None = None, on_event: EventCallback = ignore,
                    cancel: CancelToken | None = None) -> tuple[ModelHandle, FinetuneInfo]:
    """A fine-tuned copy of the base model ``handle`` (which is left as it is) and its info.

    E.g. the retain-only model of forget-quality metrics:
    ``finetuned_model(base, retain_items, replace(cfg, data="retain"))``.  The
    copy shares the tokenizer and costs one model's memory; the cache makes a
    second call cheap.
    """
    from .model import ModelHandle

    if getattr(handle, "finetune", None) is not None:
        raise UserError("pass the base model: this one is already fine-tuned", "finetune")
    if handle.wrappers:   # their hooks would be copied with the modules
        raise UserError("pass the bare base model: inference-time wrappers are installed", "finetune")
    model = copy.deepcopy(handle.model)
    twin = ModelHandle(model, handle.tokenizer, name=handle.name, device=handle.device, source=handle.source,
                       cached=handle.cached)
    twin.set_fingerprint(handle.fingerprint)   # same weights: skip hashing them again
    info = apply(twin, items, cfg, settings, on_event, cancel)
    return twin, info


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


__all__ = ["FinetuneInfo", "apply", "matches", "restore", "finetuned_model", "cache_key", "cache_files",
           "changed_names", "check_rouge1", "examples", "training_items", "derived_fingerprint", "STAGE", "VERSION"]
