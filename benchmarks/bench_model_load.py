"""Embedded model load: cold (dequantize GGUF, write the safetensors cache) vs cached.

Each load runs in a fresh subprocess so nothing is shared between them.
Usage: python benchmarks/bench_model_load.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, time, sys
t = time.perf_counter()
from unlearn_tui.backends.model import load, ModelSpec
h = load(ModelSpec())
print(json.dumps({"seconds": time.perf_counter() - t, "cached": h.cached, "device": h.device,
                  "dtype": str(h.dtype)}))
"""


def one(cache: str) -> dict:
    env = dict(os.environ, UNLEARN_TUI_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cold, warm = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            c = one(cache)
            w = one(cache)
            assert not c["cached"] and w["cached"], (c, w)
            cold.append(c["seconds"])
            warm.append(w["seconds"])
    print(f"device {c['device']}, dtype {c['dtype']} (each load in a fresh process, incl. imports)")
    print(f"cold load (dequantize GGUF + write cache): {min(cold):.2f} s  (runs: {', '.join(f'{x:.2f}' for x in cold)})")
    print(f"cached load (safetensors):                 {min(warm):.2f} s  (runs: {', '.join(f'{x:.2f}' for x in warm)})")
    print(f"ratio cold/cached: {min(cold) / min(warm):.1f}x")


if __name__ == "__main__":
    main()
