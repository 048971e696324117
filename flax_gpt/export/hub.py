"""Publishing an export to the Hugging Face Hub with `huggingface_hub`.

Every Hub failure becomes one `HFError` line that says the local export is kept. The access token
is never printed, logged, or put in an error message.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from flax_gpt import storage
from flax_gpt.errors import HFError
from flax_gpt.storage import MARKER


def _is_connection_error(e: BaseException) -> bool:
    """Network-level failure (refused, DNS, timeout) rather than an HTTP answer from the Hub.

    Matched by class name: the HTTP client behind huggingface_hub has changed (requests, httpx,
    httpx2) and each names its transport errors this way."""
    if isinstance(e, HfHubHTTPError):
        return False
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "RequestError", "ConnectionError", "Timeout", "TimeoutException",
                         "OfflineModeIsEnabled"}) or isinstance(e, (OSError, TimeoutError))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                token: str | None = None, endpoint: str | None = None) -> str:
    """Upload an export folder to the Hub repo `repo_id` (created if missing); returns its URL.

    Token: `token`, else `HF_TOKEN`, else the standard `hf auth login` token (huggingface_hub's own
    resolution). `revision` names a branch, created when missing. `endpoint` overrides the Hub URL
    (default: `HF_ENDPOINT` or huggingface.co). Any Hub failure raises one-line `HFError`; the
    local folder is only read, never changed.
    """
    folder = storage.cached_copy(str(folder), "exports", what="export folder") if storage.is_remote(folder) \
        else Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise HFError(f"{folder} is not an export folder (no config.json); run `flax-gpt export` first")
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                          ignore_patterns=[MARKER], commit_message="Upload GPT-2 exported by flax_gpt")
    except Exception as e:  # noqa: BLE001 - network, HTTP and auth failures all end the same way
        reason = " ".join(str(e).split()) or type(e).__name__
        reason = _scrub(f"{type(e).__name__}: {reason}", token)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        what = "could not reach the Hugging Face Hub to push" if _is_connection_error(e) else \
            "the Hugging Face Hub refused the push to"
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("; set HF_TOKEN to a token with write access or run `hf auth login`"
                if status in (401, 403) else "")
        raise HFError(f"{what} {repo_id}: {reason}{hint}; the local export at {folder} is kept") from None
    url = str(repo_url).rstrip("/")
    return f"{url}/tree/{revision}" if revision else url
