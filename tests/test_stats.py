"""Covariance statistics: correctness, budget, early stop, cache, export/import, corpora."""

from __future__ import annotations

import json

import pytest
import torch

from unlearn_tui.backends import stats
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.events import Progress, StageStarted

torch.set_num_threads(1)

TEXT = "\n".join(
    f"Line {i}: the capital of France is Paris, Jupiter is a gas giant and the sky is blue on day {i}."
    for i in range(200))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return str(p)


def test_second_moment_matches_direct_computation(llama_handle, corpus_file):
    from unlearn_tui.backends.batching import pad_right
    from unlearn_tui.backends.editing.hooks import capture

    h = llama_handle
    mats, info = stats.second_moments(h, [1], corpus_file, token_budget=300, tol=0.0, use_cache=False)
    C = mats[1]
    assert C.shape == (h.adapter.mlp_width,) * 2 and C.dtype == torch.float32
    assert info.tokens == 300
    chunks = []
    for c in stats.corpus_chunks(h, corpus_file, stats.SEQ_LEN):
        chunks.append(c)
        if sum(map(len, chunks)) >= 300:
            break
    total, trimmed = 0, []
    for c in chunks:
        trimmed.append(c[:300 - total])
        total += len(trimmed[-1])
    x, mask = pad_right(trimmed, h.tokenizer.pad_token_id)
    with torch.no_grad(), capture(h.model, [h.adapter.mlp_out_name(1)]) as got:
        h.model(input_ids=x, attention_mask=mask)
    k = got[h.adapter.mlp_out_name(1)][0][mask.bool()].float()
    torch.testing.assert_close(C, k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)
    assert float(torch.linalg.eigvalsh(C.double()).min()) > -1e-6  # PSD


def test_cache_budget_key_and_events(llama_handle, corpus_file):
    h = llama_handle
    events = []
    a, info = stats.second_moments(h, [0, 2], corpus_file, token_budget=1024, tol=0.0, on_event=events.append)
    assert info.cached_layers == [] and info.tokens == 1024
    assert any(isinstance(e, StageStarted) and e.stage == "covariance statistics" for e in events)
    prog = [e for e in events if isinstance(e, Progress)]
    assert prog and prog[-1].done == 1024 and prog[-1].total == 1024
    b, info2 = stats.second_moments(h, [2, 0], corpus_file, token_budget=1024)
    assert sorted(info2.cached_layers) == [0, 2] and info2.tokens == 1024
    for l in (0, 2):
        assert torch.equal(a[l], b[l])
    assert stats.cache_file(h, corpus_file, 1024, 2).is_file()
    _, info3 = stats.second_moments(h, [2], corpus_file, token_budget=512)  # another budget: not cached
    assert info3.cached_layers == [] and info3.tokens == 512


def test_early_stop_on_convergence(llama_handle, corpus_file):
    h = llama_handle
    _, loose = stats.second_moments(h, [1], corpus_file, token_budget=20000, tol=0.5, use_cache=False,
                                    min_tokens=256)
    assert loose.converged and loose.tokens < 20000
    _, strict = stats.second_moments(h, [1], corpus_file, token_budget=3000, tol=0.0, use_cache=False)
    assert not strict.converged and strict.tokens == 3000


def test_export_import_roundtrip(llama_handle, corpus_file, tmp_path, monkeypatch):
    h = llama_handle
    out = stats.export_stats(h, [1, 3], tmp_path / "mom2.safetensors", corpus=corpus_file, token_budget=512)
    mats = stats.read_export(out, h)
    assert sorted(mats) == [1, 3]
    # used directly as a corpus
    direct, info = stats.second_moments(h, [3], str(out))
    torch.testing.assert_close(direct[3], mats[3])
    # another model (different fingerprint) refuses it
    from unlearn_tui.backends import tiny

    other = tiny.handle("llama", seed=1)
    with pytest.raises(UserError) as e:
        stats.read_export(out, other)
    assert "another model" in str(e.value)
    # imported into a fresh cache, it is found under its corpus key
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "fresh"))
    assert stats.import_stats(out, h) == [1, 3]
    with pytest.raises(UserError):
        stats.second_moments(h, [2], str(out))  # the file has no layer 2


def test_hub_corpus_offline_is_user_error(llama_handle):
    with pytest.raises(UserError) as e:
        stats.second_moments(llama_handle, [1], "hub:wikitext", token_budget=512, use_cache=False)
    assert "offline" in str(e.value)


def test_missing_file_is_user_error(llama_handle):
    with pytest.raises(UserError):
        stats.second_moments(llama_handle, [1], "/nonexistent/corpus.txt", token_budget=512)


def test_self_corpus_offline_and_cached(llama_handle):
    h = llama_handle
    a, info = stats.second_moments(h, [1], "self", token_budget=600, tol=0.0, use_cache=False)
    assert info.tokens == 600
    path = stats._self_corpus_path(h, stats.SEQ_LEN)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    b, _ = stats.second_moments(h, [1], "self", token_budget=600, tol=0.0, use_cache=False)
    assert path.stat().st_mtime_ns == mtime  # the sampled text was reused, not generated again
    torch.testing.assert_close(a[1], b[1])


def test_nullspace_basis_is_cached_by_matrix(llama_handle, monkeypatch):
    """AlphaEdit's eigendecomposition is computed once per (model, layer, threshold, matrix) and then read."""
    from unlearn_tui.backends.editing import linalg

    h = llama_handle
    g = torch.Generator().manual_seed(0)
    k = torch.randn(h.adapter.mlp_width, 20, generator=g)
    C = k @ k.T / 20
    U, r = stats.nullspace_basis(h, 1, C, 1e-6, relative=True)
    assert r == h.adapter.mlp_width - 20 and U.shape == (h.adapter.mlp_width, r)

    def boom(*a, **kw):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(linalg, "nullspace_basis", boom)
    U2, r2 = stats.nullspace_basis(h, 1, C, 1e-6, relative=True)
    assert r2 == r and torch.equal(U2, U)
    with pytest.raises(AssertionError, match="recomputed"):      # another matrix is another key
        stats.nullspace_basis(h, 1, C * 2.0, 1e-6, relative=True)
    with pytest.raises(AssertionError, match="recomputed"):      # another threshold too
        stats.nullspace_basis(h, 1, C, 1e-5, relative=True)


# --------------------------------------------------------------------------- the self-sampled corpus


def _corpus(h, seq_len=stats.SEQ_LEN):
    data = json.loads(stats._self_corpus_path(h, seq_len).read_text())
    assert data["version"] == stats.CORPUS_VERSION
    return data["chunks"]


def _take(h, seq_len, tokens, **kw):
    """The self corpus' chunks until ``tokens`` were read (the generator itself never ends)."""
    out, n = [], 0
    for c in stats._self_chunks(h, seq_len, tokens=tokens, **kw):
        out.append(c)
        n += len(c)
        if n >= tokens:
            return out
    raise AssertionError("unreachable")


class _GenerateSpy:
    """Counts the rows of every ``model.generate`` call."""

    def __init__(self, model, monkeypatch):
        self.rows: list[int] = []
        real = model.generate

        def spy(*a, **kw):
            self.rows.append(int(kw["input_ids"].shape[0]))
            return real(*a, **kw)

        monkeypatch.setattr(model, "generate", spy)


def test_self_corpus_wide_batches_sized_to_the_budget(llama_handle, monkeypatch):
    """The budget is sampled in wide batches (a generate call for the chat rows and one for the raw rows
    here, on a CPU), not 16 rows at a time, and no more than it needs; every row is a full chunk."""
    h = llama_handle
    spy = _GenerateSpy(h.model, monkeypatch)
    _, info = stats.second_moments(h, [1], "self", token_budget=8192, tol=0.0, use_cache=False)
    assert info.tokens == 8192
    chunks = _corpus(h)
    seq = stats.SEQ_LEN
    assert spy.rows == [32, 32] and len(chunks) == 8192 // seq
    for j, c in enumerate(chunks):  # row j: its fixed prompt, then the model's text, to seq_len tokens
        chat, prompt = stats._row_prompt(h, j)
        assert chat == (j % 2 == 1)
        assert c[:len(prompt)] == prompt and len(c) == seq
    assert len({tuple(c) for c in chunks}) == len(chunks)
    assert stats.sample_rows(h, seq) >= 64                  # a batch holds 64+ rows on a CPU
    spy.rows.clear()                                        # a small budget: few rows, one call for all
    stats.second_moments(h, [1], "self", token_budget=8192 + 1024, tol=0.0, use_cache=False)
    assert spy.rows == [8] and len(_corpus(h)) == (8192 + 1024) // seq


def test_pick_samples_the_top_k_top_p_distribution():
    """pick() inverts the CDF of exactly the distribution of sampled generate (temperature, top-k, top-p)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 300, generator=g) * 3
    ref = scores.clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)):
        ref = w(None, ref)
    want = torch.softmax(ref, dim=-1)
    n = 20_000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n            # a uniform grid of draws
    for r in range(3):
        got = stats.pick(scores[r:r + 1].expand(n, -1), u[:, None], top_k=50, top_p=0.9, temperature=0.7)
        freq = torch.bincount(got[:, 0], minlength=300).float() / n
        assert set(got[:, 0].tolist()) == set(torch.nonzero(want[r] > 0)[:, 0].tolist())
        torch.testing.assert_close(freq, want[r], atol=2.0 / n, rtol=0)


def test_self_corpus_is_deterministic_and_versioned(llama_handle, tmp_path, monkeypatch):
    h = llama_handle
    first = _take(h, 32, 2000)                              # 63 rows: a generate call per kind
    assert sum(map(len, first)) >= 2000
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "again"))
    again = _take(h, 32, 2000)
    assert again == first                                   # same model and seed: same corpus
    assert _corpus(h, 32) == first                          # ... and that is what the cache holds
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "narrow"))
    narrow = _take(h, 32, 2000, rows=5)                     # 5 rows a call, kinds mixed
    assert narrow == first                                  # the batching does not change the text
    first = first[:19]
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "seed"))
    other = _take(h, 32, 600, seed=99)
    assert other != first                                   # another seed, another corpus
    # the corpus and the statistics keys carry the version, which moved on from 1 (16 rows per seed,
    # rows ending at end-of-sequence): a corpus or statistics of version 1 are never read
    assert stats.CORPUS_VERSION >= 2
    assert stats.corpus_key("self") == f"self-v{stats.CORPUS_VERSION}"
    assert f"-v{stats.CORPUS_VERSION}" in stats._self_corpus_path(h, 32).name
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "old"))
    path = stats._self_corpus_path(h, 32)
    path.parent.mkdir(parents=True)
    fake = [[5] * 32] * 40
    old = path.with_name(path.name.replace(f"-v{stats.CORPUS_VERSION}.json", "-v1.json"))
    old.write_text(json.dumps({"version": 1, "chunks": fake}))               # as version 1 wrote it
    path.write_text(json.dumps({"version": 1, "chunks": fake}))              # ... even under the new name
    assert _take(h, 32, 600) == first
    assert _corpus(h, 32) == first


def test_self_corpus_extends_the_cache_in_row_order(llama_handle, tmp_path, monkeypatch):
    """A larger budget later reads the cached rows and samples only the missing ones, continuing the rows."""
    h = llama_handle
    small = _take(h, 32, 200)
    calls = []
    real = stats._sample

    def spy(handle, first, n, *a):
        calls.append((first, n))
        return real(handle, first, n, *a)

    monkeypatch.setattr(stats, "_sample", spy)
    big = _take(h, 32, 900)
    assert big[:len(small)] == small and len(big) > len(small)
    assert calls == [(len(small), len(big) - len(small))]   # only the missing rows, in one batch
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = _take(h, 32, 900)     # as if sampled in one go
    assert fresh[:len(big)] == big[:len(fresh)] and sum(map(len, fresh)) >= 900


def test_sampling_progress_events(llama_handle, monkeypatch):
    h = llama_handle
    monkeypatch.setattr(stats, "PROGRESS_INTERVAL", 0.0)   # every decoding step reports (default: 4 a second)
    events = []
    stats.second_moments(h, [1], "self", token_budget=2000, tol=0.0, use_cache=False, on_event=events.append)
    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages == ["sampling statistics corpus", "covariance statistics"]  # sampled first, then the keys
    prog = [e for e in events if isinstance(e, Progress) and e.stage == "sampling statistics corpus"]
    assert len(prog) >= 2
    done = [e.done for e in prog]
    assert done == sorted(done) and prog[-1].total is not None and prog[-1].done == prog[-1].total
    assert prog[-1].done == sum(map(len, _corpus(h)))       # counted in corpus tokens
    assert prog[-1].eta_s == 0.0 and prog[-1].elapsed_s > 0
    assert all(e.eta_s is not None for e in prog) and any(e.eta_s > 0 for e in prog[:-1])


def test_self_corpus_without_chat_template():
    """A model with no chat template: every row is a raw continuation, after the BOS token."""
    from unlearn_tui.backends import tiny

    h = tiny.handle("llama", chat=False)
    chunks = _take(h, 32, 320)
    bos = h.tokenizer.bos_token_id
    for j, c in enumerate(chunks):
        chat, prompt = stats._row_prompt(h, j)
        assert not chat and prompt[0] == bos and c[:len(prompt)] == prompt and len(c) == 32
    assert len({tuple(c[:3]) for c in chunks}) > 1          # the starters take turns


def test_cancel_mid_sampling_leaves_no_cache(llama_handle, monkeypatch):
    from unlearn_tui.backends.errors import Cancelled
    from unlearn_tui.backends.events import CancelToken

    h = llama_handle
    monkeypatch.setattr(stats, "PROGRESS_INTERVAL", 0.0)
    token = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "sampling statistics corpus":
            seen.append(e.done)
            if e.done > 0:
                token.cancel()

    with pytest.raises(Cancelled):
        stats.second_moments(h, [1], "self", token_budget=4096, on_event=on_event, cancel=token)
    assert seen and seen[-1] < 4096                         # it stopped inside the first batch
    corpora = stats._self_corpus_path(h, stats.SEQ_LEN).parent
    assert not corpora.exists() or list(corpora.iterdir()) == []   # no corpus, no temporary file
    assert not stats.cache_file(h, "self", 4096, 1).exists()
    # after the cancel, a new run samples the corpus from the start
    token.reset()
    _, info = stats.second_moments(h, [1], "self", token_budget=600, tol=0.0, use_cache=False)
    assert info.tokens == 600


def test_key_pass_groups_by_tokens_and_stops_at_the_deepest_layer(llama_handle, monkeypatch):
    """Short chunks are packed into one forward pass per ``batch_size * seq_len`` tokens; blocks after the
    deepest requested layer never run."""
    from unlearn_tui.backends.batching import pad_right

    h = llama_handle
    chunks = [[(7 * i + j) % 300 + 10 for j in range(8)] for i in range(64)]   # 64 chunks of 8 tokens
    monkeypatch.setattr(stats, "corpus_chunks", lambda *a, **kw: iter(chunks))
    calls, deeper = [], []
    hooks = [h.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape),
                                               with_kwargs=True),
             h.model.get_submodule(h.adapter.block_name(2)).register_forward_pre_hook(
                 lambda m, a: deeper.append(1))]
    try:
        res, count, _ = stats.compute(h, [0, 1], "self", token_budget=512, tol=0.0, seq_len=32, batch_size=4)
    finally:
        for hk in hooks:
            hk.remove()
    assert count == 512 and [s[0] for s in calls] == [16] * 4   # 4 x 4 chunks of 32 would have been 16 passes
    assert deeper == []
    x, mask = pad_right(chunks, h.tokenizer.pad_token_id)
    from unlearn_tui.backends.editing.hooks import capture

    with torch.no_grad(), capture(h.model, [h.adapter.mlp_out_name(1)]) as got:
        h.model(input_ids=x, attention_mask=mask)
    k = got[h.adapter.mlp_out_name(1)][0][mask.bool()].float()
    torch.testing.assert_close(res[1], k.T @ k / k.shape[0], rtol=1e-4, atol=1e-6)


def test_keys_read_while_sampling_equal_the_key_pass(llama_handle, monkeypatch):
    """Cold, the keys come from the sampling itself (no key pass); from the cached corpus, the key pass
    computes the same matrices; with no room for the keys the key pass runs on the fresh corpus too."""
    from unlearn_tui.backends.editing import hooks

    h = llama_handle
    passes = []
    real = hooks.stop_after

    def counting(model, name):
        passes.append(name)
        return real(model, name)

    monkeypatch.setattr(hooks, "stop_after", counting)
    cold, info = stats.second_moments(h, [0, 2], "self", token_budget=1500, tol=0.0, use_cache=False)
    assert info.tokens == 1500 and passes == []               # no forward pass after the sampling
    warm, _ = stats.second_moments(h, [0, 2], "self", token_budget=1500, tol=0.0, use_cache=False)
    assert passes                                             # the cached corpus: the key pass ran
    for l in (0, 2):
        torch.testing.assert_close(cold[l], warm[l], rtol=1e-4, atol=1e-6)
    assert not torch.equal(cold[0], cold[2])
    # a larger budget: the cached rows need the key pass, the new ones bring their keys (one group has
    # both; the last chunk is cut to the budget, its keys too)
    passes.clear()
    mixed, info = stats.second_moments(h, [0, 2], "self", token_budget=3000, tol=0.0, use_cache=False)
    assert info.tokens == 3000 and len(passes) == 1
    ref, _ = stats.second_moments(h, [0, 2], "self", token_budget=3000, tol=0.0, use_cache=False)
    for l in (0, 2):
        torch.testing.assert_close(mixed[l], ref[l], rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(stats, "CAPTURE_BYTES", 0)
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(stats.cache_dir() / "other"))
    passes.clear()
    again, _ = stats.second_moments(h, [0, 2], "self", token_budget=1500, tol=0.0, use_cache=False)
    assert passes
    for l in (0, 2):
        torch.testing.assert_close(again[l], warm[l], rtol=1e-4, atol=1e-6)
