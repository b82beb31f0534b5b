"""Is the Hugging Face hub reachable?  Asked once, answered in seconds.

Without this, an unreachable hub costs ~50 s of client retries before the
user sees an error.  ``HF_HUB_OFFLINE=1`` short-circuits to offline.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip() in ("1", "true", "True", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
