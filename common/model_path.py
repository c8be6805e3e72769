"""Refuse a local model folder that is not there before it is taken for a hub name.

``transformers`` and vLLM read ``model`` as a folder when one exists and otherwise ask a model
hub: a misspelt ``./models/tyni`` then spends a minute on the network and fails blaming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlbus.errors import UserError


def looks_like_path(model: str) -> bool:
    """True when ``model`` can only be meant as a local folder: it starts with ``.``, ``/`` or ``~``,
    has more parts than a hub name (``owner/name``), or its first part is a local folder."""
    if model.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in model):
        return True
    parts = model.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def check_model_path(model: str) -> None:
    """A :class:`UserError` when ``model`` looks like a local path and no folder is there."""
    path = Path(model).expanduser()
    if looks_like_path(model) and not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise UserError(f"no model folder at {model} ({what}): fix --model (a local model folder, "
                        "or a hub name such as Qwen/Qwen3-0.6B)")


def position_limit(hf_config: dict[str, Any]) -> int | None:
    """The longest sequence a model's ``config.json`` (as a dict) allows, or None when it does not say."""
    # Multimodal configs keep the language model's length in text_config.
    limit = hf_config.get("max_position_embeddings") or hf_config.get("text_config", {}).get("max_position_embeddings")
    return limit if isinstance(limit, int) else None
