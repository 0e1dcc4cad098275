"""The training engine: configs, the run assembly, the trainer, checkpoints, distributed set-up, metrics, reports.

The names below load on first use (PEP 562): ``kdfast --help`` reads its option lists from
torch-free modules of this package without importing torch, the models or the distillers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Config", "ConfigError", "StudentsReport", "Summary", "evaluate", "load_config", "train", "train_students"]
_WHERE = {
    "Config": "config",
    "ConfigError": "config",
    "load_config": "config",
    "StudentsReport": "report",
    "Summary": "report",
    "evaluate": "trainer",
    "train": "trainer",
    "train_students": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"kdfast.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kdfast.engine' has no attribute {name!r}")
