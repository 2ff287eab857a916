"""Checkpoints: plain dicts of tensors and primitives (so ``torch.load(weights_only=True)`` reads them), always
carrying the full resolved config (``Config.to_dict``) so models are rebuilt from the file alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic save: write to a temporary file, then rename (an interrupted save never corrupts the last one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    torch.save(payload, str(tmp))
    os.replace(tmp, p)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        ck = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable rtvc checkpoint: {e}") from None
    if not isinstance(ck, dict) or "config" not in ck:
        raise CheckpointError(f"{p} is not an rtvc checkpoint (no config inside)")
    if kind is not None and ck.get("kind") != kind:
        raise CheckpointError(f"{p} holds a '{ck.get('kind')}' checkpoint, expected '{kind}'")
    return ck
