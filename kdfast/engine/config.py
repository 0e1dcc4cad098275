"""Run configuration: dataclass schema, YAML loading, ``--set key=value`` overrides, validation.

A config file has the sections ``data``, ``model``, ``method``, ``optim`` and ``train`` (see the
dataclasses below and the files under ``kdfast/configs/``). A file may name a ``base:`` file
(relative to itself) whose values it overrides. An optional ``runs:`` list trains several
students in one run on one teacher and one data order (:class:`RunConfig`, :func:`students`):
each entry says what its student changes (label, seed, student model, method, optim values),
and each student becomes a complete single-run config of its own. Unknown keys, methods, models and datasets, and
missing data or teacher checkpoints, raise :class:`ConfigError` naming the problem before any
training starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdfast import distillers, models
from kdfast._coerce import coerce_fields
from kdfast.data import DATASETS, DECODES

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MethodConfig",
    "OptimConfig",
    "TrainConfig",
    "RunConfig",
    "CONFIG_DIR",
    "load_config",
    "from_dict",
    "apply_overrides",
    "validate",
    "validate_data",
    "resolve_path",
    "to_dict",
    "students",
    "with_seeds",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad configuration, detected before training starts."""


@dataclass
class DataConfig:
    dataset: str = "digits"  # one of kdfast.data.DATASETS
    root: str | None = None  # folder of the dataset's files (not used by "digits")
    batch_size: int = 64  # of all processes together (under torchrun each takes batch_size / world size)
    eval_batch_size: int | None = None  # default: batch_size; all processes together too
    train_per_class: int | None = None  # train on the first N images of each class only (digits, CIFAR)
    decode: str = "auto"  # ImageNet only (others ignore it): gpu (batched nvJPEG, main process), cpu (PIL in workers), auto
    workers: int | None = None  # ImageNet's DataLoader processes (None: the cores available to the process)


@dataclass
class ModelConfig:
    student: str = "resnet8"  # the model trained (a teacher is trained as a "student" of method vanilla)
    teacher: str | None = None  # the frozen teacher of a distillation method
    teacher_checkpoint: str | None = None  # local file: mdistiller {"model": ...} or a bare state_dict


@dataclass
class MethodConfig:
    name: str = "vanilla"  # one of kdfast.distillers.names()
    params: dict[str, Any] = field(default_factory=dict)  # the method's Params fields


@dataclass
class OptimConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])  # epochs where lr *= gamma
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 240
    seed: int = 0  # model initialisation and every random draw of the training step
    data_seed: int | None = None  # sample order and augmentation of every epoch (None: seed)
    deterministic: bool = False  # deterministic algorithms only (slower), for bit-exact reruns
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "bf16" autocast, "none", or "auto" (bf16 on GPU, none on CPU)
    channels_last: bool = True
    compile: bool = False  # torch.compile the student step
    out_dir: str = "runs/default"
    max_train_batches: int | None = None  # cap per epoch (smoke tests); None: whole epoch
    max_eval_batches: int | None = None
    progress: bool = True  # tqdm bar per epoch on a terminal (rank 0); one line per epoch otherwise
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" the run, or "skip" that step's update
    max_nonfinite: int = 10  # with "skip": stop once this many steps were skipped


@dataclass
class RunConfig:
    """One student of a multi-student run: what it changes in the config's own student.

    Students with the same ``label`` (default: the method's name) are seeds of one table row;
    each student is named ``<label>-s<seed>`` and writes to ``<train.out_dir>/<name>/``.
    """

    label: str | None = None  # the table row (default: the method name)
    seed: int | None = None  # default: train.seed
    student: str | None = None  # default: model.student
    method: str | dict[str, Any] | None = None  # a method name, or {name: ..., <param>: ...}; default: method
    optim: dict[str, Any] = field(default_factory=dict)  # optim values of this student (lr, milestones, ...)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runs: list[RunConfig] = field(default_factory=list)  # several students in one run (empty: one)


_SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "optim": OptimConfig, "train": TrainConfig}
_LABEL_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


def _build_section(name: str, values: Any) -> Any:
    cls = _SECTION_CLASSES[name]
    if values is None:
        return cls()
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(values).__name__}")
    values = dict(values)
    if cls is MethodConfig:  # method: {name: kd, temperature: 4, ...}: every other key is a param
        method = values.pop("name", "vanilla")
        if not isinstance(method, str):
            raise ConfigError(f"method.name: expected str, got {method!r} ({type(method).__name__})")
        return MethodConfig(name=method, params=values)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) in section {name!r}: {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    try:
        return cls(**coerce_fields(cls, values, name))
    except TypeError as error:
        raise ConfigError(f"bad config: {error}") from None


def _build_runs(values: Any) -> list[RunConfig]:
    if values is None:
        return []
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"runs must be a list of mappings, got {type(values).__name__}")
    runs, valid = [], [f.name for f in dataclasses.fields(RunConfig)]
    for i, entry in enumerate(values):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"runs[{i}] must be a mapping (e.g. {{method: kd, seed: 1}}), got {entry!r}")
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) in runs[{i}]: {', '.join(map(str, unknown))}; valid keys: {', '.join(valid)}")
        try:
            runs.append(RunConfig(**coerce_fields(RunConfig, entry, f"runs[{i}]")))
        except TypeError as error:
            raise ConfigError(f"bad config: {error}") from None
    return runs


def from_dict(values: Mapping[str, Any]) -> Config:
    """A Config from nested mappings; unknown sections or keys raise ConfigError naming them."""
    unknown = sorted(set(values) - {*_SECTION_CLASSES, "runs"})
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}; valid sections: {', '.join(_SECTION_CLASSES)}, runs")
    return Config(
        **{name: _build_section(name, values.get(name)) for name in _SECTION_CLASSES}, runs=_build_runs(values.get("runs"))
    )


def to_dict(cfg: Config) -> dict[str, Any]:
    """The nested-mapping form of `cfg` (as written in YAML; method params inline; no ``runs``
    when it has none)."""
    values = dataclasses.asdict(cfg)
    method = values.pop("method")
    values["method"] = {"name": method["name"], **method["params"]}
    if not values["runs"]:
        del values["runs"]
    return values


def _student_values(cfg: Config, run: RunConfig) -> tuple[str, str, dict[str, Any]]:
    """(label, name, the single-run config values) of one entry of ``cfg.runs``."""
    values = to_dict(dataclasses.replace(cfg, runs=[]))
    if run.method is not None:
        values["method"] = {"name": run.method} if isinstance(run.method, str) else dict(run.method)
    if run.student is not None:
        values["model"]["student"] = run.student
    values["optim"].update(run.optim)
    seed = cfg.train.seed if run.seed is None else run.seed
    label = run.label or str(values["method"].get("name", "vanilla"))
    name = f"{label}-s{seed}"
    values["train"].update(
        seed=seed,
        data_seed=cfg.train.data_seed if cfg.train.data_seed is not None else cfg.train.seed,
        out_dir=str(Path(cfg.train.out_dir) / name),
    )
    return label, name, values


def students(cfg: Config) -> list[tuple[str, str, Config]]:
    """(label, name, config) of every student `cfg` trains: its ``runs``, each a complete single-run
    config (its own seed, method, model, optim and ``<out_dir>/<name>``, the shared data order
    ``train.data_seed``); for a config without runs, ``[(method, "", cfg)]``. Raises ConfigError."""
    if not cfg.runs:
        return [(cfg.method.name, "", cfg)]
    found: list[tuple[str, str, Config]] = []
    for i, run in enumerate(cfg.runs):
        label, name, values = _student_values(cfg, run)
        if not set(label) <= _LABEL_CHARACTERS:
            raise ConfigError(f"runs[{i}]: label {label!r} may only hold letters, digits and _ . + -")
        if any(name == other for _, other, _ in found):
            raise ConfigError(f"runs[{i}]: two students are named {name!r} (same label and seed); give a label or seed")
        try:
            found.append((label, name, from_dict(values)))
        except ConfigError as error:
            raise ConfigError(f"runs[{i}] ({name}): {error}") from None
    return found


def with_seeds(cfg: Config, seeds: Sequence[int]) -> Config:
    """`cfg` with each of its runs (or its own student) repeated for every seed of `seeds`."""
    runs = cfg.runs or [RunConfig()]
    return dataclasses.replace(cfg, runs=[dataclasses.replace(run, seed=seed) for run in runs for seed in seeds])


def resolve_path(path: str | Path) -> Path:
    """A config file: an existing path, else one relative to the shipped ``kdfast/configs`` (".yaml" optional)."""
    path = Path(path)
    for candidate in (path, CONFIG_DIR / path, CONFIG_DIR / path.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (looked in the current folder and in {CONFIG_DIR})")


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) else value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = values.pop("base", None)
    return _merge(_read_yaml((path.parent / base).resolve()), values) if base else values


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to nested mappings."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"bad override {item!r}: expected section.key=value, e.g. train.epochs=2")
        section, name = parts
        values = _merge(values, {section: {name: yaml.safe_load(raw)}})
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate; raises ConfigError."""
    values = _read_yaml(resolve_path(path)) if path is not None else {}
    cfg = from_dict(apply_overrides(values, overrides))
    validate(cfg, check_files)
    return cfg


def _data_problems(data: DataConfig, check_files: bool) -> list[str]:
    if data.dataset not in DATASETS:
        return [f"unknown dataset {data.dataset!r}; valid: {', '.join(DATASETS)}"]
    if data.dataset == "digits":
        return []
    if data.root is None:
        return [f"dataset {data.dataset!r} needs data.root"]
    if check_files and not Path(data.root).is_dir():
        return [f"data.root {data.root!r} is not a folder (missing data for {data.dataset!r})"]
    return []


def validate_data(data: DataConfig) -> None:
    """Check the dataset name and that its folder exists; raises ConfigError."""
    problems = _data_problems(data, True)
    if problems:
        raise ConfigError("; ".join(problems))


def _value_problems(cfg: Config) -> list[str]:
    """Values of the right type but out of their range."""
    data, optim, train = cfg.data, cfg.optim, cfg.train
    checks = [
        (train.amp in ("auto", "bf16", "none"), f"train.amp must be auto, bf16 or none, got {train.amp!r}"),
        (train.epochs >= 1, f"train.epochs must be >= 1, got {train.epochs}"),
        (data.batch_size >= 1, f"data.batch_size must be >= 1, got {data.batch_size}"),
        (
            data.eval_batch_size is None or data.eval_batch_size >= 1,
            f"data.eval_batch_size must be >= 1, got {data.eval_batch_size}",
        ),
        (
            data.train_per_class is None or data.train_per_class >= 1,
            f"data.train_per_class must be >= 1, got {data.train_per_class}",
        ),
        (data.train_per_class is None or data.dataset != "imagenet", "data.train_per_class is for digits, cifar10 and cifar100"),
        (data.decode in DECODES, f"data.decode must be one of {', '.join(DECODES)}, got {data.decode!r}"),
        (data.workers is None or data.workers >= 0, f"data.workers must be >= 0, got {data.workers}"),
        (optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}"),
        (0 <= optim.momentum < 1, f"optim.momentum must be in [0, 1), got {optim.momentum}"),
        (optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}"),
        (optim.gamma > 0, f"optim.gamma must be > 0, got {optim.gamma}"),
        (all(m >= 1 for m in optim.milestones), f"optim.milestones must be epochs >= 1, got {optim.milestones}"),
        (
            all(a < b for a, b in zip(optim.milestones, optim.milestones[1:])),
            f"optim.milestones must be strictly increasing, got {optim.milestones}",
        ),
        (not optim.nesterov or optim.momentum > 0, "optim.nesterov needs optim.momentum > 0"),
        (
            train.max_train_batches is None or train.max_train_batches >= 1,
            f"train.max_train_batches must be >= 1, got {train.max_train_batches}",
        ),
        (
            train.max_eval_batches is None or train.max_eval_batches >= 1,
            f"train.max_eval_batches must be >= 1, got {train.max_eval_batches}",
        ),
        (train.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be stop or skip, got {train.on_nonfinite!r}"),
        (train.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {train.max_nonfinite}"),
    ]
    return [message for ok, message in checks if not ok]


def validate(cfg: Config, check_files: bool = True) -> None:
    """Check names, method parameters and (with `check_files`) data and checkpoint files, of the
    config and of each student of its ``runs``."""
    if cfg.runs:
        for _, name, student in students(cfg):
            try:
                validate(student, check_files)
            except ConfigError as error:
                raise ConfigError(f"student {name}: {error}") from None
        return
    problems = _data_problems(cfg.data, check_files)
    for role in ("student", "teacher"):
        name = getattr(cfg.model, role)
        valid = models.names(cfg.data.dataset if cfg.data.dataset in DATASETS else None)
        if name is not None and name not in valid:
            problems.append(f"unknown model.{role} {name!r} for dataset {cfg.data.dataset!r}; valid: {', '.join(valid)}")
    try:
        method = distillers.get(cfg.method.name)
        params = distillers.make_params(cfg.method.name, cfg.method.params)
    except (ValueError, TypeError) as error:
        problems.append(str(error))
    else:
        # SoKD reads the SGD momentum buffer from the parameters' change divided by the lr it was told
        optim_lr = getattr(params, "optim_lr", None)
        if optim_lr is not None and optim_lr != cfg.optim.lr:
            problems.append(f"method.optim_lr ({optim_lr}) must equal optim.lr ({cfg.optim.lr}): set both")
        if method.needs_teacher:
            if cfg.model.teacher is None:
                problems.append(f"method {cfg.method.name!r} needs model.teacher")
            if cfg.model.teacher_checkpoint is None:
                problems.append(f"method {cfg.method.name!r} needs model.teacher_checkpoint (or --teacher-checkpoint)")
            elif check_files and not Path(cfg.model.teacher_checkpoint).is_file():
                problems.append(f"teacher checkpoint {cfg.model.teacher_checkpoint!r} not found")
    problems += _value_problems(cfg)
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
