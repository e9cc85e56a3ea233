"""Whether the Hugging Face Hub can be used right now: decided once, before any download is tried.

The Hub client retries a failed connection several times and logs each retry; an offline user
should get one line at once instead. A Hub name is used only when the user allows network access
(no ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) and the Hub's host answers within a few seconds.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def offline_variable() -> str | None:
    """The name of the first offline variable that is switched on, else ``None``."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return name
    return None


def hub_endpoint() -> str:
    """The Hub's address (``HF_ENDPOINT`` where set)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be used now (one phrase), or ``None`` when it answers."""
    variable = offline_variable()
    if variable is not None:
        return f"{variable} is set"
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{host} does not answer: {exc.strerror or type(exc).__name__}"
