"""How fast a model samples its statistics corpus: measured once, remembered, turned into "≈ N s".

The method form states what a statistics budget costs (tui/widgets/method.py):
in tokens, and in time.  The time comes from the tokens per second measured
while the model last sampled a statistics corpus on that device (the Run
pane's "sampling statistics corpus" stage; :func:`observe` records it, in
``cache_dir()/tui/sampling-rates.json``), else from a documented estimate
(:data:`ESTIMATES`): always marked "≈".  No Textual and no torch here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

STAGE = "sampling statistics corpus"     # the engine's stage name (backends/stats.py)
MIN_TOKENS = 64                          # a measurement needs this many sampled tokens
MIN_SECONDS = 0.5                        # ... and this much time (shorter says little)

ESTIMATES = {"tiny": 3000.0, "cpu": 12.0, "cuda": 250.0, "mps": 60.0}
"""Tokens per second before a measurement: ``tiny:`` test models; a ~100-500M model on a CPU (the embedded
SmolLM2 on 2 cores samples ~10-15 tok/s), on a CUDA GPU, on Apple's MPS.  Larger models on a CPU are slower."""

_lock = threading.Lock()


def rates_file() -> Path:
    from unlearn_tui.backends.paths import cache_dir

    return cache_dir() / "tui" / "sampling-rates.json"


def device_kind(device: str | None) -> str:
    d = (device or "").lower()
    for kind in ("cuda", "mps"):
        if d.startswith(kind):
            return kind
    return "cpu"


def _key(model: str, device: str | None) -> str:
    return f"{model}|{device_kind(device)}"


def _read() -> dict:
    try:
        data = json.loads(rates_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measured(model: str, device: str | None) -> float | None:
    """Tokens per second measured for ``model`` on ``device``'s kind, or None."""
    v = _read().get(_key(model, device))
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def record(model: str, device: str | None, tokens: int, seconds: float) -> float | None:
    """Remember a measurement (``tokens`` sampled in ``seconds``); returns the rate, None when too short."""
    if tokens < MIN_TOKENS or seconds < MIN_SECONDS:
        return None
    rate = tokens / seconds
    with _lock:
        data = _read()
        data[_key(model, device)] = round(rate, 3)
        try:
            from unlearn_tui.backends.fileio import atomic_write

            path = rates_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
        except OSError:
            pass     # a rate we cannot store costs an estimate next time, nothing else
    return rate


def rate(model: str, device: str | None) -> tuple[float, bool]:
    """(tokens per second, measured?) for ``model`` on ``device``."""
    got = measured(model, device)
    if got is not None:
        return got, True
    if str(model).startswith("tiny:"):
        return ESTIMATES["tiny"], False
    return ESTIMATES[device_kind(device)], False


def duration(seconds: float) -> str:
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ({s:,.0f} s)"
    return f"{s / 3600:.1f} h ({s:,.0f} s)"


def cost(tokens: int, model: str, device: str | None) -> str:
    """``≈ 11 min (683 s) at 12 tok/s (an estimate for cpu; measured at the first sampling)``."""
    r, was_measured = rate(model, device)
    how = (f"measured on {device_kind(device)}" if was_measured
           else f"an estimate for {device_kind(device)}, measured at the first sampling")
    return f"≈ {duration(tokens / r)} at {r:,.0f} tok/s ({how})"


class Observer:
    """Watches one job's progress messages and records the sampling rate when the stage ends."""

    def __init__(self) -> None:
        self.best: tuple[int, float] | None = None

    def progress(self, stage: str, done: int, elapsed_s: float) -> None:
        if stage == STAGE and done > 0:
            self.best = (int(done), float(elapsed_s))

    def finish(self, model: str, device: str | None) -> float | None:
        got, self.best = self.best, None
        if got is None:
            return None
        return record(model, device, got[0], got[1])
