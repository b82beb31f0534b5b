"""Helpers shared by the benchmark scripts (timing, peak RSS, printing)."""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager


def rss_mb() -> float:
    """Current resident set size in MiB."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process so far in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(label: str, results: dict):
    t = time.perf_counter()
    yield
    results[label] = time.perf_counter() - t


def machine_line() -> str:
    import platform

    import torch

    return (f"machine: {platform.machine()} {os.cpu_count()} cpu, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
