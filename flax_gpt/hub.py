"""Hugging Face Hub names: whether a name is a Hub id or a local path (the rule `transformers`
follows: an existing local path wins), offline mode, and a quick reachability check.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flax_gpt.storage import connects

# A Hub repo id as huggingface_hub's `validate_repo_id` accepts it: `name` or `owner/name`.
_HUB_ID = re.compile(r"^(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]{0,94}\w)?$", re.ASCII)


def is_hub_id(text) -> bool:
    """A Hugging Face Hub id, decided as `transformers` does: an existing local path wins; otherwise
    a valid repo id with or without an owner (`distilgpt2`, `openai-community/gpt2`) is one."""
    text = text.strip() if isinstance(text, str) else ""
    valid = _HUB_ID.match(text) and "--" not in text and ".." not in text and not text.endswith(".git")
    return bool(valid) and not Path(text).exists()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set (read now: huggingface_hub reads it only when it is imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check before a Hub call, so offline users get an error in seconds, not after
    huggingface_hub's minute of retries. True when offline mode is set (the local cache answers)
    or a proxy is configured (we cannot judge reachability through it)."""
    if hub_offline():
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return connects(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)
