"""The KV-cache name of the installed transformers: one helper, no deprecated keyword from our calls."""

from __future__ import annotations

import warnings

import torch

from unlearn_tui.backends import tiny
from unlearn_tui.backends.compat import cache_kwarg, call_cache, output_cache
from unlearn_tui.backends.editing.lifelong import CallTracker
from unlearn_tui.backends.generation import plain_generate


def test_cache_round_trip_through_forward_gives_the_full_forward_logits():
    h = tiny.handle("llama")
    ids = torch.tensor([h.prompt_ids("What is the capital of France?")])
    full = h.model(input_ids=ids).logits[0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # neither our keyword nor our attribute read may warn
        out = h.model(input_ids=ids[:, :-1], use_cache=True)
        cache = output_cache(out)
        assert cache is not None
        step = h.model(input_ids=ids[:, -1:], use_cache=True, **{cache_kwarg(h.model): cache}).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_call_cache_reads_either_name():
    assert call_cache({"cache": 1}) == 1
    assert call_cache({"past_key_values": 2}) == 2
    assert call_cache({"cache": None, "attention_mask": 3}) is None


def test_call_tracker_sees_cached_generation_steps():
    h = tiny.handle("llama")
    tracker = CallTracker()
    seen: list[bool] = []
    hook = h.model.register_forward_hook(lambda *a: seen.append(tracker.continuing))
    tracker.install(h.model)
    try:
        # the model's own generate: what runs whenever a wrapper (GRACE's tracker) is installed on the handle
        plain_generate(h, [h.prompt_ids("What is the capital of France?")], max_new_tokens=4)
    finally:
        tracker.remove()
        hook.remove()
    assert seen[0] is False and len(seen) >= 2 and all(seen[1:])


def test_a_handle_with_a_wrapper_generates_through_the_model_s_own_generate():
    """GRACE's tracker relies on generate's cached calls: with any wrapper installed the plain path runs."""
    from unlearn_tui.backends import generation, shared_prefix

    h = tiny.handle("llama")
    h.wrappers.append(object())
    try:
        assert not shared_prefix.usable(h)
        calls: list[int] = []
        real = h.model.generate
        h.model.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
        generation.generate(h, [h.prompt_ids("Sky?")], max_new_tokens=2)
        assert calls == [1]
    finally:
        h.wrappers.clear()
        del h.model.generate
