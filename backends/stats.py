"""Covariance ("mom2") statistics of MLP keys: ``C_l = E[k k^T]`` per layer.

ROME's covariance adjustment, MEMIT's prior and AlphaEdit's null space all
need the uncentred second moment of the keys (inputs of the MLP output
projection) over ordinary text.  The reference tools read 100k Wikipedia
articles; here the default is cheap, offline and cached:

* **Corpora** (``corpus=``):
  ``"self"`` (default) — text sampled from the model itself, generated on
  demand and cached per model under ``cache_dir()/corpora/``; works with no
  network.  Row ``j`` is a raw continuation of a generic starter or, every
  other row when the model has a chat template, a chat answer to a generic
  instruction; it is sampled (temperature 1, top-k 50, top-p 0.95) with its
  own seeded draws, so the same model and seed give the same corpus whatever
  the batching, and runs to ``seq_len`` tokens (an end-of-sequence token
  starts a new text rather than ending the row).  Rows are sampled in wide
  batches, sized by a token budget (:data:`SAMPLE_TOKENS`: 128 rows of 128
  tokens on a CPU, 256 on CUDA) and by how many tokens the caller will read;
  the keys of the requested layers are read during that generation (up to
  :data:`CAPTURE_BYTES`), so text sampled just now needs no second forward pass.  :data:`CORPUS_VERSION` is
  in the corpus file's name and in the statistics' cache key.
  ``"hub:wikitext"`` or ``"hub:OWNER/NAME[:CONFIG]"`` — a Hugging Face text
  data set, streamed (a :class:`UserError` when offline).
  A path to a ``.txt`` file — the user's own text.
  A path to a ``.safetensors`` file — statistics exported earlier
  (:func:`export_stats`), used as they are.
  With ``base_dir`` (the session's folder) a path is relative to it and must
  resolve inside it (a ``..``, an absolute path or a symlink leading out of
  it is a UserError) unless ``allow_outside`` or ``UNLEARN_TUI_ALLOW_OUTSIDE=1``.
* **Budget and early stop**: keys are accumulated in float32 over groups of
  chunks (up to ``batch_size * seq_len`` tokens each, in corpus order) until
  ``token_budget`` tokens (default 8,192) were seen, or earlier when the
  estimate has converged: the relative Frobenius change of ``C`` between
  consecutive groups is below ``tol`` for every layer (checked once at least
  ``min_tokens`` were seen).  The key pass (for text not sampled just now)
  ends each forward at the deepest requested layer.
* **Cache**: one ``.safetensors`` per (model fingerprint, corpus, budget,
  layer) under ``cache_dir()/stats/`` (``VERSION`` in the metadata); all
  missing layers are computed in ONE pass over the corpus.
* **Share**: :func:`export_stats` writes the layers to one ``.safetensors``
  file with metadata (fingerprint, corpus, tokens); :func:`import_stats` puts
  such a file into the cache after checking the fingerprint.

Progress is reported through :class:`~backends.events.Tracker`, counted in
tokens: stage ``"sampling statistics corpus"`` while the self corpus is
sampled (done/total and ETA, at most every :data:`PROGRESS_INTERVAL`
seconds), then ``"covariance statistics"``.  The cancel token is checked at
every decoding step and every group; a cancelled sampling writes no corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
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
CORPUS_VERSION = 2  # 2: rows seeded one by one and sampled in wide batches (1: 16 rows per seed)
DEFAULT_CORPUS = "self"
DEFAULT_BUDGET = 8_192
DEFAULT_TOL = 0.01
SEQ_LEN = 128
MIN_TOKENS = 2_048
SEED = 1234
TOP_K, TOP_P, TEMPERATURE = 50, 0.95, 1.0
SAMPLE_TOKENS = {"cpu": 16_384, "cuda": 32_768}  # tokens per sampling batch (rows = this // seq_len)
KEY_PASS_GROUPS = {"cpu": 1, "cuda": 4}         # convergence groups read by one forward pass
PROGRESS_INTERVAL = 0.25                         # seconds between sampling Progress events (at most)
CAPTURE_BYTES = 1 << 30                          # at most this much for keys read while sampling
SPLIT_MIN_ROWS = 16                              # rows of each kind for a generate call per kind (CPU)

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


def cache_file(handle: ModelHandle, corpus: str, budget: int, layer: int, key: str | None = None) -> Path:
    """The cache file of one layer; ``key`` is ``corpus_key(corpus)`` when the caller has it (a file
    corpus is hashed once per call of :func:`second_moments`, not once per layer and again per save)."""
    return _stats_dir() / handle.fingerprint / f"{key or corpus_key(corpus)}-b{budget}-L{layer}.safetensors"


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


def _kind(handle: ModelHandle) -> str:
    return "cuda" if str(handle.input_device).startswith("cuda") else "cpu"


def key_pass_groups(handle: ModelHandle) -> int:
    """How many convergence groups one forward pass of the key pass reads (:data:`KEY_PASS_GROUPS`)."""
    return KEY_PASS_GROUPS[_kind(handle)]


def sample_rows(handle: ModelHandle, seq_len: int) -> int:
    """How many sequences one sampling batch holds: a token budget (:data:`SAMPLE_TOKENS`) over ``seq_len``."""
    budget = SAMPLE_TOKENS[_kind(handle)]
    return max(8, budget // max(1, seq_len))


def _row_prompt(handle: ModelHandle, j: int) -> tuple[bool, list[int]]:
    """Row ``j``'s kind (chat or raw) and prompt ids: a fixed function of ``j``, whatever the batching."""
    tok = handle.tokenizer
    if handle.has_chat_template and j % 2 == 1:
        return True, handle.encode_prompt(handle.format_prompt(INSTRUCTIONS[(j // 2) % len(INSTRUCTIONS)],
                                                               raw=True))
    k = j // 2 if handle.has_chat_template else j
    ids = list(tok(STARTERS[k % len(STARTERS)], add_special_tokens=False)["input_ids"])
    if tok.bos_token_id is not None and not handle.has_chat_template:
        ids = [tok.bos_token_id] + ids
    return False, ids


def _row_uniforms(seed: int, j: int, n: int) -> Any:
    """Row ``j``'s ``n`` uniform draws (CPU, float32): its own generator, so rows never share randomness."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + j) % (2**63 - 1))
    return torch.rand(n, generator=g, dtype=torch.float32)


def pick(scores: Any, u: Any, top_k: int = TOP_K, top_p: float = TOP_P, temperature: float = TEMPERATURE) -> Any:
    """One token per row of ``scores`` (``(rows, vocab)``), drawn with the row's uniform ``u`` (``(rows, 1)``).

    The distribution of ``generate(do_sample=True, temperature, top_k, top_p)`` (temperature, then the
    ``top_k`` best, then the smallest head of those holding ``top_p`` of the mass), sampled by inverting
    its cumulative distribution at ``u``: only the ``top_k`` best are sorted, never the vocabulary.
    Returns ``(rows, 1)`` token ids on the device of ``scores``.
    """
    import torch

    vals, idx = scores.topk(min(top_k, scores.shape[-1]), dim=-1)             # sorted, best first
    probs = torch.softmax(vals.float() / temperature, dim=-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)       # the nucleus (the best stays)
    cdf = probs.cumsum(-1)
    at = (cdf < u * cdf[:, -1:]).sum(-1, keepdim=True).clamp_(max=vals.shape[-1] - 1)
    return idx.gather(1, at)


class _Sampled:
    """Progress of the corpus sampling in tokens: a :class:`Tracker` made on the first sampled batch,
    stepped at most every ``interval`` seconds (:data:`PROGRESS_INTERVAL`; every decoding step checks
    the cancel token)."""

    def __init__(self, on_event: EventCallback, cancel: CancelToken | None, total: int | None,
                 detail: str, interval: float | None = None) -> None:
        self.on_event, self.cancel, self.total, self.detail = on_event, cancel, total, detail
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.tracker: Tracker | None = None
        self.pending = 0
        self.last = 0.0

    def start(self) -> None:
        if self.tracker is None:
            self.tracker = Tracker(self.on_event, self.cancel, "sampling statistics corpus", self.total,
                                   detail=self.detail)
            self.last = time.perf_counter()
        else:
            self.tracker.check()

    def add(self, n: int, flush: bool = False) -> None:
        assert self.tracker is not None
        self.pending += n
        now = time.perf_counter()
        if flush or (self.pending and now - self.last >= self.interval):
            t = self.tracker
            if t.total is not None and t.done + self.pending > t.total:
                t.total = t.done + self.pending  # more than planned: the total follows
            self.last = now
            n, self.pending = self.pending, 0
            t.step(n, detail=f"{t.done + n} tokens")
        else:
            self.tracker.check()


class KeyedChunk(list):
    """A chunk of token ids with its keys, read while it was sampled: ``keys[module name]`` is a
    ``(len(chunk), d)`` tensor (the model's dtype and device) of the input of that module."""

    keys: dict[str, Any]


def _sample_group(handle: ModelHandle, prompts: dict[int, list[int]], seq_len: int, seed: int,
                  progress: _Sampled, capture: Sequence[str] = ()) -> dict[int, list[int]]:
    """``{row: chunk}`` for the rows of ``prompts`` (``{row: prompt ids}``): ONE ``generate`` call whose
    last logits processor draws every row's next token with :func:`pick` and the row's own uniforms.
    A row runs to ``seq_len`` tokens: an end-of-sequence token does not end it (the model starts a new
    text after it, as in a packed corpus), so no row idles while the others finish.

    With ``capture`` (module names), the inputs of those modules are read during the generation, one
    more step is run so that the last token's are too, and the chunks are :class:`KeyedChunk` objects;
    when the buffers would pass :data:`CAPTURE_BYTES`, or the calls are not the expected ones (one
    prefill, then one token per step), plain chunks are returned and the caller runs the key pass.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from .batching import pad_left

    model, tok = handle.model, handle.tokenizer
    out: dict[int, list[int]] = {j: p[:seq_len] for j, p in prompts.items() if len(p) >= seq_len}
    live = [j for j in prompts if j not in out]    # rows with something left to generate
    progress.add(sum(len(c) for c in out.values()))
    if not live:
        return out
    limits = [seq_len - len(prompts[j]) for j in live]
    steps = max(limits)
    alive = [sum(1 for n in limits if n > t) for t in range(steps)]   # rows still short of seq_len at step t
    ids, mask = pad_left([prompts[j] for j in live], tok.pad_token_id, handle.input_device)
    width = ids.shape[1]
    progress.add(sum(len(prompts[j]) for j in live))
    u = torch.stack([_row_uniforms(seed, j, steps) for j in live]).to(ids.device)
    item = torch.empty((), dtype=handle.dtype).element_size()
    names = list(capture) if len(live) * (width + steps) * handle.adapter.mlp_width * item * len(capture) \
        <= CAPTURE_BYTES else []

    class RowSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            t = input_ids.shape[1] - width
            nxt = pick(scores, u[:, min(t, steps - 1):min(t, steps - 1) + 1])
            progress.add(alive[t] if t < steps else 0)     # the extra step (keys of the last token) adds none
            return torch.full_like(scores, float("-inf")).scatter_(1, nxt, 0.0)   # generate keeps it

    prefill: dict[str, Any] = {}
    fed: dict[str, Any] = {}
    calls = dict.fromkeys(names, 0)

    def hook(name):
        def pre(_m, args):
            x = args[0]
            c = calls[name]
            calls[name] = c + 1
            if c == 0:
                prefill[name] = x.detach().clone()
            elif c <= steps and x.ndim == 3 and x.shape[1] == 1:
                if name not in fed:
                    fed[name] = torch.empty((x.shape[0], steps, x.shape[-1]), dtype=x.dtype, device=x.device)
                fed[name][:, c - 1] = x[:, 0]        # the input of generated token c - 1
        return pre

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps + (1 if names else 0),
                                 do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                                 logits_processor=LogitsProcessorList([RowSampler()]),
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
    finally:
        for h in hooks:
            h.remove()
    keyed = bool(names) and all(calls[n] == steps + 1 and n in fed and prefill[n].shape[:2] == ids.shape
                                for n in names)
    for r, (j, n, g) in enumerate(zip(live, limits, gen[:, width:steps + width].tolist())):
        chunk = prompts[j] + g[:n]
        if keyed:
            chunk = KeyedChunk(chunk)
            p = len(prompts[j])
            chunk.keys = {name: torch.cat([prefill[name][r, width - p:], fed[name][r, :n]]) for name in names}
        out[j] = chunk
    return out


def _sample(handle: ModelHandle, first: int, n: int, seq_len: int, seed: int, progress: _Sampled,
            capture: Sequence[str] = ()) -> list[list[int]]:
    """Rows ``first .. first + n - 1`` of the corpus, in ``generate`` calls of rows alike.

    On a CPU with at least :data:`SPLIT_MIN_ROWS` rows of each kind, each kind (chat or raw) is one
    call: its rows need the same number of steps (a chat prompt fills a third of a chunk), and a CPU
    pays for every row and step.  Otherwise (few rows, where a step costs about the same whatever its
    width, or CUDA) all rows are one call.
    """
    progress.start()
    kinds: dict[bool, dict[int, list[int]]] = {}
    for j in range(first, first + n):
        chat, prompt = _row_prompt(handle, j)
        kinds.setdefault(chat, {})[j] = prompt
    groups = list(kinds.values())
    if _kind(handle) != "cpu" or min(map(len, groups)) < SPLIT_MIN_ROWS:
        groups = [{j: p for g in groups for j, p in g.items()}]
    got: dict[int, list[int]] = {}
    for prompts in groups:
        got.update(_sample_group(handle, prompts, seq_len, seed, progress, capture))
    return [got[j] for j in range(first, first + n)]


def _self_chunks(handle: ModelHandle, seq_len: int, seed: int = SEED, tokens: int | None = None,
                 on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                 rows: int | None = None, capture: Sequence[str] = ()) -> Iterator[list[int]]:
    """Token chunks sampled from the model, cached and extended on demand.

    Row ``j`` of the corpus is a fixed prompt (:func:`_row_prompt`) continued with its own seeded
    draws, so the corpus is the same whatever the batching.  Rows are sampled ``rows`` at a time
    (default :func:`sample_rows`); ``tokens`` (how many the caller will read, if known) sizes the
    batches so little is sampled beyond it.  The cache file is rewritten, atomically, after each batch.
    Newly sampled chunks come with the inputs of the ``capture`` modules (:class:`KeyedChunk`, see
    :func:`_sample_group`); chunks read from the cache are plain.
    """
    path = _self_corpus_path(handle, seq_len)
    chunks: list[list[int]] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") == CORPUS_VERSION and data.get("seed", SEED) == seed:
                chunks = [list(map(int, c)) for c in data["chunks"]]
        except (OSError, ValueError, KeyError, TypeError):
            chunks = []
    yield from chunks
    width = rows or sample_rows(handle, seq_len)
    have = sum(map(len, chunks))
    want = None if tokens is None else max(0, tokens - have)
    progress = _Sampled(on_event, cancel, want, f"{seq_len}-token sequences from the model, up to {width} at a time")
    sampled = 0
    while True:
        n = width
        if want is not None and sampled < want:  # enough rows for what is still wanted (seq_len each)
            n = max(1, min(width, math.ceil((want - sampled) / seq_len)))
        new = _sample(handle, len(chunks), n, seq_len, seed, progress, capture)
        chunks.extend(list(c) for c in new)     # plain lists: the cache never holds the keys
        sampled += sum(map(len, new))
        progress.add(0, flush=True)
        _write_json_atomic(path, {"version": CORPUS_VERSION, "seed": seed, "chunks": chunks})
        while new:                              # handed over one by one: the caller frees the keys it used
            yield new.pop(0)


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


def corpus_chunks(handle: ModelHandle, corpus: str, seq_len: int = SEQ_LEN, tokens: int | None = None,
                  on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                  capture: Sequence[str] = ()) -> Iterator[list[int]]:
    """The corpus as token chunks of up to ``seq_len``.  For ``"self"``: ``tokens`` (how many the caller
    will read, if known) sizes the sampling, whose progress and cancel point are ``on_event`` and
    ``cancel``, and newly sampled chunks carry the inputs of the ``capture`` modules (:class:`KeyedChunk`)."""
    if corpus == "self":
        return _self_chunks(handle, seq_len, tokens=tokens, on_event=on_event, cancel=cancel, capture=capture)
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
    """Uncached computation: ({layer: C (float32, d_in x d_in)}, tokens used, converged).

    The keys are summed over groups of chunks of up to ``batch_size * seq_len`` tokens, in corpus
    order; the convergence check runs after each group.  Chunks sampled just now bring their keys
    (:class:`KeyedChunk`: read while the model generated them); for the others one forward pass
    reads :func:`key_pass_groups` groups at once and ends at the deepest layer's key.
    """
    import torch

    from .batching import pad_right
    from .editing.hooks import capture, stop_after

    ad = handle.adapter
    layers = [ad.check_layer(l, "stats.layers") for l in layers]
    names = {l: ad.mlp_out_name(l) for l in layers}
    d = ad.mlp_width
    # each layer's statistics accumulate on that layer's device (where its keys are read)
    acc = {l: torch.zeros(d, d, dtype=torch.float32, device=handle.device_of(names[l])) for l in layers}
    prev: dict = {}
    count = 0
    converged = False
    tracker: Tracker | None = None
    pad = handle.tokenizer.pad_token_id or 0
    it = corpus_chunks(handle, corpus, seq_len, tokens=token_budget, on_event=on_event, cancel=cancel,
                       capture=list(names.values()))
    group_tokens = max(1, batch_size) * seq_len
    per_pass = key_pass_groups(handle)
    read = 0          # tokens taken from the corpus (the last chunk trimmed to the budget)
    exhausted = False
    while count < token_budget and not exhausted and not converged:
        # groups of (ids, keys read while sampling or None)
        groups: list[list[tuple[list[int], dict | None]]] = []
        while len(groups) < per_pass and read < token_budget and not exhausted:
            group: list[tuple[list[int], dict | None]] = []
            size = 0
            while size < group_tokens and read < token_budget:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                take = min(len(nxt), token_budget - read)
                keys = getattr(nxt, "keys", None)
                group.append((list(nxt[:take]), {k: v[:take] for k, v in keys.items()} if keys else None))
                size += take
                read += take
            if group:
                groups.append(group)
        if not groups:
            break
        if tracker is None:  # after the corpus was sampled (its own stage), so the ETA is the key pass's
            tracker = Tracker(on_event, cancel, "covariance statistics", token_budget,
                              detail=f"{corpus}, layers {', '.join(map(str, layers))}")
        todo = [g for g in groups if any(k is None or any(n not in k for n in names.values()) for _, k in g)]
        fwd = {id(g) for g in todo}
        if todo:
            ids, mask = pad_right([c for g in todo for c, _ in g], pad, handle.input_device)
            with torch.no_grad(), capture(handle.model, list(names.values()), "input") as got, \
                    stop_after(handle.model, names[max(layers)]):
                # the forward ends at the deepest layer's key: no later blocks, no (batch, seq, vocab) logits
                handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
            sel_all = mask.bool()
            passed = {l: got[name][0][sel_all.to(got[name][0].device)]   # (tokens, d), corpus order
                      for l, name in names.items()}
        start = 0
        for group in groups:
            n = sum(len(c) for c, _ in group)
            with torch.no_grad():
                for l, name in names.items():
                    k = passed[l][start:start + n] if id(group) in fwd else \
                        torch.cat([keys[name] for _, keys in group])
                    k = k.to(device=acc[l].device, dtype=torch.float32)
                    acc[l].addmm_(k.T, k)
            if id(group) in fwd:
                start += n
            count += n
            # convergence: relative change of the normalised estimate between groups
            cur = {l: acc[l] / count for l in layers}
            if count >= min_tokens and prev:
                worst = max(float((cur[l] - prev[l]).norm() / cur[l].norm().clamp_min(1e-12)) for l in layers)
                converged = worst < tol
            prev = cur
            tracker.step(n, detail=f"{count} tokens")
            if converged:
                break
    if count == 0:
        raise UserError(f'the corpus "{corpus}" gave no text', "stats.corpus")
    return prev, count, converged


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
        return {l: loaded[l].to(_layer_device(handle, l)) for l in layers}, info
    todo = []
    key = corpus_key(corpus) if use_cache else None
    for l in layers:
        got = _load(cache_file(handle, corpus, token_budget, l, key)) if use_cache else None
        if got is not None:
            out[l] = got[0].to(_layer_device(handle, l))
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
                _save(cache_file(handle, corpus, token_budget, l, key), c.cpu(),
                      {"version": VERSION, "fingerprint": handle.fingerprint, "layer": l, "corpus": corpus,
                       "budget": token_budget, "tokens": count, "converged": conv, "tol": tol})
    info.seconds = time.perf_counter() - t0
    return out, info


def _layer_device(handle: ModelHandle, layer: int) -> Any:
    """Where layer ``layer``'s statistics live: the device of its MLP output projection."""
    return handle.device_of(handle.adapter.mlp_out_name(layer))


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
