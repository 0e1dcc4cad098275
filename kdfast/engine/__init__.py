"""The training engine: configs, the trainer, checkpoints, distributed set-up, metrics, reports."""

from kdfast.engine.config import Config, ConfigError, load_config
from kdfast.engine.report import StudentsReport, Summary
from kdfast.engine.trainer import evaluate, train, train_students

__all__ = ["Config", "ConfigError", "StudentsReport", "Summary", "evaluate", "load_config", "train", "train_students"]
