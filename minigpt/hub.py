"""Reaching the Hugging Face hub: `datasets.load_dataset`, offline when the hub cannot answer.

Design choices
- `datasets` is imported lazily: it takes seconds to import and local sources never need it.
- Before a hub load a short TCP probe of the endpoint decides whether to go offline, so without a
  network a cached dataset still loads and a missing one fails at once (HubUnreachable, one line),
  not after minutes of HTTP retries. Behind a proxy nothing is probed: `datasets` decides.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def one_line(exc: BaseException) -> str:
    """First line of an exception's message, prefixed with its type (for wrapped errors)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, imported lazily: `datasets` takes seconds to import and local
    sources never need it. Offline first: see `hub_offline`."""
    offline = hub_offline()
    import datasets

    if offline:  # the hub libraries read the flag at import time: set it where they keep it
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:
        if offline and _OFFLINE_WHY:
            raise HubUnreachable(_OFFLINE_WHY) from e
        raise


class HubUnreachable(ConnectionError):
    """The hub could not be reached and the dataset is not in the local cache."""


_OFFLINE_WHY = ""  # why `hub_offline` went offline (empty when the user asked for it)


def hub_offline(timeout: float = 2.0) -> bool:
    """True when hub loads must use the local cache only: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is
    set, or a TCP connection to the endpoint (HF_ENDPOINT, default huggingface.co) fails within
    `timeout` seconds (not probed behind an HTTP(S) proxy). Offline, `datasets` loads a cached
    dataset or fails at once, instead of retrying HTTP requests first; a user who downloaded once
    can work without a network."""
    global _OFFLINE_WHY
    from urllib.parse import urlsplit

    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(v.strip().upper() in ("1", "ON", "YES", "TRUE") for v in flags):
        _OFFLINE_WHY = ""
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return False  # behind a proxy a direct connection proves nothing: let `datasets` try
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        _OFFLINE_WHY = (f"the hub ({endpoint}) is unreachable ({one_line(e)}) and the dataset "
                        f"is not in the local cache")
        os.environ["HF_HUB_OFFLINE"] = "1"  # for any hub library imported later in this process
        return True
    return False
