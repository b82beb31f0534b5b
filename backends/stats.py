"""Covariance ("mom2") statistics of MLP keys: ``C_l = E[k k^T]`` per layer.

ROME's covariance adjustment, MEMIT's prior and AlphaEdit's null space all
need the uncentred second moment of the keys (inputs of the MLP output
projection) over ordinary text.  The reference tools read 100k Wikipedia
articles; here the default is cheap, offline and cached:

* **Corpora** (``corpus=``):
  ``"self"`` (default) — text sampled from the model itself (seeded; half raw
  continuations of generic starters, half chat answers to generic
  instructions when the model has a chat template), generated on demand and
  cached per model under ``cache_dir()/corpora/``; works with no network.
  ``"hub:wikitext"`` or ``"hub:OWNER/NAME[:CONFIG]"`` — a Hugging Face text
  data set, streamed (a :class:`UserError` when offline).
  A path to a ``.txt`` file — the user's own text.
  A path to a ``.safetensors`` file — statistics exported earlier
  (:func:`export_stats`), used as they are.
  With ``base_dir`` (the session's folder) a path is relative to it and must
  resolve inside it (a ``..``, an absolute path or a symlink leading out of
  it is a UserError) unless ``allow_outside`` or ``UNLEARN_TUI_ALLOW_OUTSIDE=1``.
* **Budget and early stop**: keys are accumulated in float32 over batches of
  ``seq_len``-token chunks until ``token_budget`` tokens (default 8,192) were seen, or earlier
  when the estimate has converged: the relative Frobenius change of ``C``
  between consecutive batches is below ``tol`` for every layer (checked once
  at least ``min_tokens`` were seen).
* **Cache**: one ``.safetensors`` per (model fingerprint, corpus, budget,
  layer) under ``cache_dir()/stats/`` (``VERSION`` in the metadata); all
  missing layers are computed in ONE pass over the corpus.
* **Share**: :func:`export_stats` writes the layers to one ``.safetensors``
  file with metadata (fingerprint, corpus, tokens); :func:`import_stats` puts
  such a file into the cache after checking the fingerprint.

Progress is reported through :class:`~backends.events.Tracker` (stage
``"covariance statistics"``, counted in tokens); the cancel token is checked
every batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .fileio import atomic_write, save_safetensors
from .paths import cache_dir

if TYPE_CHECKING:
    from .model import ModelHandle

VERSION = 1
CORPUS_VERSION = 1
DEFAULT_CORPUS = "self"
DEFAULT_BUDGET = 8_192
DEFAULT_TOL = 0.01
SEQ_LEN = 128
MIN_TOKENS = 2_048

STARTERS = ("The", "In", "A", "It", "This", "When", "Many", "One", "After", "There", "Scientists", "During",
            "According to", "Most", "People", "Today")
INSTRUCTIONS = ("Tell me an interesting fact.", "Write a short paragraph about history.",
                "Explain a scientific idea in simple words.", "Describe a famous city.",
                "Write a few sentences about a country.", "What should I know about animals?",
                "Tell me about a famous person.", "Give me some advice about learning.",
                "Describe a sport and its rules.", "Write about a musical instrument.",
                "Explain how something in nature works.", "Tell me about a book or a film.")


@dataclass
class StatsInfo:
    corpus: str
    layers: list[int]
    tokens: int = 0
    seconds: float = 0.0
    cached_layers: list[int] = field(default_factory=list)
    converged: bool = False


# --------------------------------------------------------------------------- paths


def _stats_dir() -> Path:
    return cache_dir() / "stats"


def resolve_corpus(corpus: str, base_dir: str | os.PathLike | None = None, where: str = "stats.corpus",
                   allow_outside: bool = False) -> str:
    """``corpus`` with a file path resolved against the session's folder and confined to it.

    ``"self"`` and ``"hub:..."`` are returned as they are; a path becomes an
    absolute, resolved one (see :func:`backends.editing.lifelong.session_path`:
    a one-line UserError at ``where`` when it leaves ``base_dir``).  Without
    ``base_dir`` a path is relative to the current directory.
    """
    if corpus == "self" or corpus.startswith("hub:"):
        return corpus
    from .editing.lifelong import ALLOW_OUTSIDE_ENV, session_path

    p = session_path(corpus, base_dir, where, allow_outside, opt_in=f"set {ALLOW_OUTSIDE_ENV}=1")
    if not p.is_file():
        raise UserError(f'corpus file not found: {corpus} ({p}); expected "self", "hub:wikitext", a .txt file or '
                        f'a .safetensors statistics file', where)
    return str(p)


def corpus_key(corpus: str) -> str:
    """A file-name-safe key that changes when the corpus changes."""
    if corpus == "self":
        return f"self-v{CORPUS_VERSION}"
    if corpus.startswith("hub:"):
        return "hub-" + "".join(c if c.isalnum() else "_" for c in corpus[4:])
    p = Path(corpus).expanduser()
    if not p.is_file():
        raise UserError(f'corpus file not found: {corpus}; expected "self", "hub:wikitext", a .txt file or a '
                        f'.safetensors statistics file', "stats.corpus")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"file-{p.stem[:24]}-{h.hexdigest()[:12]}"


def cache_file(handle: ModelHandle, corpus: str, budget: int, layer: int) -> Path:
    return _stats_dir() / handle.fingerprint / f"{corpus_key(corpus)}-b{budget}-L{layer}.safetensors"


# --------------------------------------------------------------------------- corpora


def _self_corpus_path(handle: ModelHandle, seq_len: int) -> Path:
    return cache_dir() / "corpora" / f"self-{handle.fingerprint}-s{seq_len}-v{CORPUS_VERSION}.json"


def _write_json_atomic(path: Path, obj: Any) -> None:
    """A cache file written atomically (:mod:`backends.fileio`); one we cannot write is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(obj))
    except OSError:
        pass


def _self_chunks(handle: ModelHandle, seq_len: int, batch: int = 16, seed: int = 1234) -> Iterator[list[int]]:
    """Token chunks sampled from the model, cached and extended on demand."""
    from .generation import generate

    path = _self_corpus_path(handle, seq_len)
    chunks: list[list[int]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") == CORPUS_VERSION:
                chunks = [list(map(int, c)) for c in data["chunks"]]
        except (OSError, ValueError, KeyError, TypeError):
            chunks = []
    yield from chunks
    tok = handle.tokenizer
    b = len(chunks) // batch
    while True:
        prompts = []
        chat = handle.has_chat_template and b % 2 == 1
        for i in range(batch):
            j = b * batch + i
            if chat:
                prompts.append(handle.encode_prompt(handle.format_prompt(INSTRUCTIONS[j % len(INSTRUCTIONS)],
                                                                         raw=True)))
            else:
                ids = list(tok(STARTERS[j % len(STARTERS)], add_special_tokens=False)["input_ids"])
                if tok.bos_token_id is not None and not handle.has_chat_template:
                    ids = [tok.bos_token_id] + ids
                prompts.append(ids)
        texts = generate(handle, prompts, max_new_tokens=seq_len, batch_size=batch, sample=True,
                         seed=seed + b, temperature=1.0)
        new = []
        for p, t in zip(prompts, texts):
            ids = p + list(tok(t, add_special_tokens=False)["input_ids"])
            new.append(ids[:seq_len])
        chunks.extend(new)
        _write_json_atomic(path, {"version": CORPUS_VERSION, "chunks": chunks})
        b += 1
        yield from new


def _text_chunks(handle: ModelHandle, texts: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    tok = handle.tokenizer
    buf: list[int] = []
    for t in texts:
        if not t or not t.strip():
            continue
        buf.extend(tok(t, add_special_tokens=False)["input_ids"])
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
    if len(buf) >= 8:
        yield buf


def _file_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.strip())
                if sum(len(x) for x in para) > 2000:
                    yield " ".join(para)
                    para = []
            elif para:
                yield " ".join(para)
                para = []
        if para:
            yield " ".join(para)


def _hub_texts(spec: str) -> Iterator[str]:
    name = spec[4:]
    if name in ("wikitext", "wikitext-103"):
        repo, config = "Salesforce/wikitext", "wikitext-103-raw-v1"
    elif name == "wikitext-2":
        repo, config = "Salesforce/wikitext", "wikitext-2-raw-v1"
    else:
        repo, _, config = name.partition(":")
        config = config or None
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f'the corpus "{spec}" needs the network and this process is offline; use '
                        f'corpus = "self" or a text file', "stats.corpus")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split="train", streaming=True)
        for rec in ds:
            text = rec.get("text") or rec.get("content") or ""
            if isinstance(text, str):
                yield text
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f'could not read the corpus "{spec}" ({first[:160]}); use corpus = "self" (offline) '
                        f'or a text file', "stats.corpus") from None


def corpus_chunks(handle: ModelHandle, corpus: str, seq_len: int = SEQ_LEN) -> Iterator[list[int]]:
    if corpus == "self":
        return _self_chunks(handle, seq_len)
    if corpus.startswith("hub:"):
        return _text_chunks(handle, _hub_texts(corpus), seq_len)
    return _text_chunks(handle, _file_texts(Path(corpus).expanduser()), seq_len)


# --------------------------------------------------------------------------- computing


def _save(path: Path, tensor: Any, meta: dict) -> None:
    """One cache file written atomically (:mod:`backends.fileio`); one we cannot write is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, {"mom2": tensor.contiguous()}, {k: str(v) for k, v in meta.items()})
    except OSError:
        pass


def _load(path: Path) -> tuple[Any, dict] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("version") != str(VERSION):
                return None
            return f.get_tensor("mom2"), meta
    except Exception:
        return None


def compute(handle: ModelHandle, layers: Sequence[int], corpus: str = DEFAULT_CORPUS,
            token_budget: int = DEFAULT_BUDGET, tol: float = DEFAULT_TOL, seq_len: int = SEQ_LEN,
            batch_size: int = 16, min_tokens: int = MIN_TOKENS,
            on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> tuple[dict, int, bool]:
    """Uncached computation: ({layer: C (float32, d_in x d_in)}, tokens used, converged)."""
    import torch

    from .batching import pad_right
    from .editing.hooks import capture, stop_after

    ad = handle.adapter
    layers = [ad.check_layer(l, "stats.layers") for l in layers]
    names = {l: ad.mlp_out_name(l) for l in layers}
    d = ad.mlp_width
    acc = {l: torch.zeros(d, d, dtype=torch.float32, device=handle.device) for l in layers}
    prev: dict = {}
    count = 0
    converged = False
    tracker = Tracker(on_event, cancel, "covariance statistics", token_budget,
                      detail=f"{corpus}, layers {', '.join(map(str, layers))}")
    pad = handle.tokenizer.pad_token_id or 0
    it = corpus_chunks(handle, corpus, seq_len)
    exhausted = False
    while count < token_budget and not exhausted:
        batch: list[list[int]] = []
        room = token_budget - count
        while len(batch) < batch_size and sum(len(b) for b in batch) < room:
            nxt = next(it, None)
            if nxt is None:
                exhausted = True
                break
            batch.append(nxt[:max(1, room - sum(len(b) for b in batch))])
        if not batch:
            break
        ids, mask = pad_right(batch, pad, handle.device)
        with torch.no_grad(), capture(handle.model, list(names.values()), "input") as got, \
                stop_after(handle.model, names[max(layers)]):
            # the forward ends at the deepest layer's key: no later blocks, no (batch, seq, vocab) logits
            handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
        sel = mask.bool()
        n = int(sel.sum())
        for l, name in names.items():
            k = got[name][0][sel].float()
            acc[l].addmm_(k.T, k)
        count += n
        # convergence: relative change of the normalised estimate between batches
        if count >= min_tokens and prev:
            worst = 0.0
            for l in layers:
                cur = acc[l] / count
                worst = max(worst, float((cur - prev[l]).norm() / cur.norm().clamp_min(1e-12)))
            if worst < tol:
                converged = True
        prev = {l: acc[l] / count for l in layers}
        tracker.step(n, detail=f"{count} tokens")
        if converged:
            break
    if count == 0:
        raise UserError(f'the corpus "{corpus}" gave no text', "stats.corpus")
    return {l: acc[l] / count for l in layers}, count, converged


def second_moments(handle: ModelHandle, layers: Sequence[int], corpus: str = DEFAULT_CORPUS,
                   token_budget: int = DEFAULT_BUDGET, tol: float = DEFAULT_TOL, use_cache: bool = True,
                   on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                   base_dir: str | os.PathLike | None = None, where: str = "stats.corpus",
                   allow_outside: bool = False, **kw: Any) -> tuple[dict, StatsInfo]:
    """``{layer: E[k k^T]}`` for the layers, from the cache when possible (see the module doc).

    ``base_dir`` is the session's folder: a corpus path is relative to it and
    confined to it (:func:`resolve_corpus`; errors name ``where``).
    """
    t0 = time.perf_counter()
    ad = handle.adapter
    layers = list(dict.fromkeys(ad.check_layer(l, "stats.layers") for l in layers))
    info = StatsInfo(corpus, layers)
    corpus = resolve_corpus(corpus, base_dir, where, allow_outside)
    out: dict = {}
    if corpus.endswith(".safetensors"):
        loaded = read_export(corpus, handle)
        missing = [l for l in layers if l not in loaded]
        if missing:
            raise UserError(f"the statistics file {corpus} has no layer(s) {', '.join(map(str, missing))}; it "
                            f"has {', '.join(map(str, sorted(loaded)))}", "stats.corpus")
        info.cached_layers = list(layers)
        info.seconds = time.perf_counter() - t0
        return {l: loaded[l].to(handle.device) for l in layers}, info
    todo = []
    for l in layers:
        got = _load(cache_file(handle, corpus, token_budget, l)) if use_cache else None
        if got is not None:
            out[l] = got[0].to(handle.device)
            info.cached_layers.append(l)
            info.tokens = max(info.tokens, int(got[1].get("tokens", 0)))
        else:
            todo.append(l)
    if todo:
        on_event(Log(f"computing key statistics for layer(s) {', '.join(map(str, todo))} on {corpus} "
                     f"(up to {token_budget} tokens); cached afterwards"))
        res, count, conv = compute(handle, todo, corpus, token_budget, tol, on_event=on_event, cancel=cancel, **kw)
        info.tokens, info.converged = count, conv
        for l, c in res.items():
            out[l] = c
            if use_cache:
                _save(cache_file(handle, corpus, token_budget, l), c.cpu(),
                      {"version": VERSION, "fingerprint": handle.fingerprint, "layer": l, "corpus": corpus,
                       "budget": token_budget, "tokens": count, "converged": conv, "tol": tol})
    info.seconds = time.perf_counter() - t0
    return out, info


def nullspace_basis(handle: ModelHandle, layer: int, cov: Any, threshold: float, relative: bool = False,
                    use_cache: bool = True) -> tuple[Any, int]:
    """AlphaEdit's null-space basis of ``cov`` (see :func:`backends.editing.linalg.nullspace_basis`), cached.

    The eigendecomposition of a ``d x d`` second moment is derived statistics:
    it is cached next to them, keyed by the model, the layer, the threshold
    and a hash of the matrix itself (so a recomputed ``cov`` never meets a
    stale basis).
    """
    from .editing.linalg import nullspace_basis as compute

    digest = hashlib.sha256(cov.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
    mode = "rel" if relative else "abs"
    path = _stats_dir() / handle.fingerprint / f"null-L{layer}-{mode}{threshold!r}-{digest}.safetensors"
    if use_cache:
        got = _load(path)
        if got is not None:
            u = got[0].to(cov.device)
            return u, int(u.shape[1])
    u, r = compute(cov, threshold, relative)
    if use_cache:
        _save(path, u.cpu(), {"version": VERSION, "fingerprint": handle.fingerprint, "layer": layer,
                              "threshold": threshold, "relative": relative, "cov_sha256_16": digest})
    return u, r


# --------------------------------------------------------------------------- sharing


def export_stats(handle: ModelHandle, layers: Sequence[int], path: str | os.PathLike, corpus: str = DEFAULT_CORPUS,
                 token_budget: int = DEFAULT_BUDGET, **kw: Any) -> Path:
    """Write the layers' statistics (computing missing ones) to one ``.safetensors`` file (atomically)."""
    mats, info = second_moments(handle, layers, corpus, token_budget, **kw)
    path = Path(path)
    meta = {"format": "unlearn-tui-mom2", "version": str(VERSION), "fingerprint": handle.fingerprint,
            "model": str(getattr(handle, "name", "")), "corpus": corpus, "budget": str(token_budget),
            "tokens": str(info.tokens), "layers": ",".join(map(str, sorted(mats)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, {f"layer.{l}": m.cpu().contiguous() for l, m in mats.items()}, meta)
    return path


def read_export(path: str | os.PathLike, handle: ModelHandle | None = None) -> dict:
    """``{layer: C}`` from an exported file; checks the model fingerprint when ``handle`` is given."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"statistics file not found: {p}", "stats")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            mats = {int(k.split(".", 1)[1]): f.get_tensor(k) for k in f.keys() if k.startswith("layer.")}
    except Exception as exc:
        raise UserError(f"{p} is not a readable .safetensors statistics file ({exc})", "stats") from None
    if meta.get("format") != "unlearn-tui-mom2":
        raise UserError(f"{p} is not an unlearn-tui statistics export (no format metadata)", "stats")
    if handle is not None and meta.get("fingerprint") != handle.fingerprint:
        raise UserError(f"{p} was computed for another model (fingerprint {meta.get('fingerprint')}, this model "
                        f"is {handle.fingerprint})", "stats")
    d = handle.adapter.mlp_width if handle is not None else None
    for l, m in mats.items():
        if m.ndim != 2 or m.shape[0] != m.shape[1] or (d is not None and m.shape[0] != d):
            raise UserError(f"{p}: layer {l} has shape {tuple(m.shape)}, expected ({d}, {d})", "stats")
    return mats


def import_stats(path: str | os.PathLike, handle: ModelHandle) -> list[int]:
    """Put an exported file into this model's cache (under its corpus and budget); returns the layers."""
    from safetensors import safe_open

    mats = read_export(path, handle)
    with safe_open(str(Path(path).expanduser()), framework="pt") as f:
        meta = f.metadata() or {}
    corpus, budget = meta.get("corpus", "imported"), int(meta.get("budget", 0) or 0)
    if corpus not in ("self",) and not corpus.startswith("hub:"):
        corpus = "imported"
    for l, m in mats.items():
        target = _stats_dir() / handle.fingerprint / f"{corpus_key(corpus) if corpus != 'imported' else 'imported'}" \
                                                      f"-b{budget}-L{l}.safetensors"
        _save(target, m, {"version": VERSION, "fingerprint": handle.fingerprint, "layer": l, "corpus": corpus,
                          "budget": budget, "tokens": meta.get("tokens", 0), "imported_from": str(path)})
    return sorted(mats)
