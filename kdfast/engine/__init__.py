"""The training engine: configs, the trainer, checkpoints, distributed set-up, metrics."""

from kdfast.engine.config import Config, ConfigError, load_config
from kdfast.engine.trainer import Summary, evaluate, train

__all__ = ["Config", "ConfigError", "Summary", "evaluate", "load_config", "train"]
