"""Covariance statistics: correctness, budget, early stop, cache, export/import, corpora."""

from __future__ import annotations

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
    from unlearn_tui.backends.editing.hooks import capture
    from unlearn_tui.backends.batching import pad_right

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
