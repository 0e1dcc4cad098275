"""Atomic, checksummed checkpoints and the random-number-generator states an exact resume needs.

A run's resumable state rotates through two files: :func:`save_rotating` moves ``last.pt`` to
``prev.pt`` and writes the new ``last.pt``, each next to a ``<file>.sha256`` holding the SHA-256 of
its bytes, every file written to a temporary name and then ``os.replace``-d (never a torn file).
:func:`load_latest` verifies ``last.pt`` (checksum, then unpickling) and falls back to ``prev.pt``
with a warning; :class:`CheckpointError` names every file it tried when neither is usable.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_atomic",
    "save_rotating",
    "load",
    "load_verified",
    "load_latest",
    "rng_state",
    "set_rng_state",
]

CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or fails its checksum."""


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to `path`, then ``os.replace``: never a torn file."""
    _write_atomic(_serialize(obj), Path(path))


def save_rotating(obj: Any, path: str | Path, previous: str | Path) -> None:
    """Writes `obj` to `path` with its checksum, after moving the current `path` (and its checksum)
    to `previous`; a crash at any point leaves at least one complete, verifiable file."""
    path, previous = Path(path), Path(previous)
    data = _serialize(obj)
    if path.is_file():
        checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
        if checksum.is_file():
            os.replace(checksum, previous.with_name(previous.name + CHECKSUM_SUFFIX))
        os.replace(path, previous)
    _write_atomic(data, path)
    _write_atomic(hashlib.sha256(data).hexdigest().encode() + b"\n", path.with_name(path.name + CHECKSUM_SUFFIX))


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by the trainer (on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def load_verified(path: str | Path) -> dict[str, Any]:
    """:func:`load` after checking the file against its recorded checksum (if one was written);
    CheckpointError naming the file and the fault otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
    if checksum.is_file():
        expected = checksum.read_text().strip()
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt file): sha256 {actual}, recorded {expected}")
    try:
        state = load(path)
    except Exception as error:  # torch.load raises many types for a damaged archive
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a kdfast checkpoint (holds a {type(state).__name__})")
    return state


def load_latest(path: str | Path, previous: str | Path) -> dict[str, Any]:
    """The state in `path`, or, if that file is unusable, in `previous` (with a warning naming
    what was wrong); CheckpointError naming both files when neither can be used."""
    try:
        return load_verified(path)
    except CheckpointError as error:
        first = error
    try:
        state = load_verified(previous)
    except CheckpointError as error:
        raise CheckpointError(f"no usable checkpoint: {first}; {error}") from None
    warnings.warn(f"{first}; resuming from the previous checkpoint {previous} instead", RuntimeWarning, stacklevel=2)
    return state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) every CUDA generator's state."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
