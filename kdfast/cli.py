"""The `kdfast` command line: train, eval, bench, viz, quickstart, demo.

Configuration problems (unknown method, model, dataset or key, missing data or checkpoint) are
reported as ``kdfast: error: ...`` with exit status 2 before any training starts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from kdfast import demo

    rows = demo.run(batch=args.batch, device=args.device, dtype=args.dtype, repeats=args.repeats)
    return 0 if rows else 1


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """--set items, then the shortcut options (which win)."""
    shortcuts = {
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "train.out_dir": args.out_dir,
        "train.device": args.device,
        "model.teacher_checkpoint": args.teacher_checkpoint,
        "data.root": args.data_root,
    }
    overrides = list(args.set)
    overrides += [f"{key}={value}" for key, value in shortcuts.items() if value is not None]
    overrides += [f"train.{flag}=true" for flag in ("deterministic", "compile") if getattr(args, flag)]
    return overrides


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"repeated seed in {text!r}")
    return seeds


def _train(args: argparse.Namespace) -> int:
    """Exit status 0 when the run ends, 1 when it (or a student of it) diverged, 128 + signal when
    SIGTERM/SIGINT stopped it after a checkpoint (as a shell reports a process a signal ended)."""
    from kdfast.engine import distributed, load_config, train, train_students
    from kdfast.engine.config import validate, with_seeds
    from kdfast.engine.report import format_table
    from kdfast.engine.trainer import Diverged, Interrupted

    cfg = load_config(args.config, _train_overrides(args))
    if args.seeds:
        cfg = with_seeds(cfg, args.seeds)
        validate(cfg)
    try:
        if cfg.runs:
            report = train_students(cfg, resume=args.resume)
        else:
            summary = train(cfg, resume=args.resume)
    except Diverged as error:
        print(f"kdfast: error: {error}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"kdfast: {error}", file=sys.stderr)
        return 128 + error.signum
    finally:
        distributed.teardown()
    if cfg.runs:
        print(
            f"\n{format_table(report.rows)}\n(mean ± sample std over seeds; each student's run under "
            f"{cfg.train.out_dir}/<label>-s<seed>/, the table in summary.json, every curve in curves.png)"
        )
        return 1 if any(row.stopped for row in report.rows) else 0
    print(
        f"best top-1 {summary.best_top1:.2f} (epoch {summary.best_epoch}), last {summary.last_top1:.2f}, "
        f"{summary.wall_s:.1f} s, {summary.images_per_s:.0f} img/s"
        + (f", peak GPU memory {summary.peak_gpu_mem_bytes / 2**20:.0f} MiB" if summary.peak_gpu_mem_bytes else "")
        + f"; outputs in {summary.out_dir}"
    )
    return 0


def _check_checkpoint(name: str, path: str) -> None:
    from kdfast import models
    from kdfast.engine import ConfigError

    if name not in models.names():
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(models.names())}")
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {path!r} not found")


def _check_data(dataset: str, root: str | None) -> None:
    from kdfast.engine.config import DataConfig, validate_data

    validate_data(DataConfig(dataset=dataset, root=root))


def _eval(args: argparse.Namespace) -> int:
    from kdfast import models
    from kdfast.data import build_loaders
    from kdfast.engine import evaluate
    from kdfast.engine.distributed import setup

    _check_data(args.dataset, args.data_root)
    _check_checkpoint(args.model, args.checkpoint)
    device = setup(args.device).device
    loaders = build_loaders(args.dataset, args.data_root, args.batch_size, device)
    model = models.create(args.model, loaders.num_classes, weights=args.checkpoint, dataset=args.dataset).to(device)
    top1 = evaluate(model, loaders.test, device, args.amp)
    print(f"{args.model} {args.checkpoint} on {args.dataset} test: top-1 {top1:.2f}%")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e:
        from kdfast.engine.bench import run_e2e
        from kdfast.engine.e2e_methods import METHODS

        batch = args.batch or (8 if args.quick else 64)
        iters = args.iters or (3 if args.quick else 20)
        warmup = 1 if args.quick else 3
        if args.students:
            from kdfast.engine.bench import run_students_e2e

            methods = args.methods or ["kd"]
            run_students_e2e(device, methods, args.students, batch, iters, warmup, args.pair, out=args.out, note=args.note)
            return 0
        methods = args.methods or [m for m in METHODS if args.pair == "cifar100" or m != "afd"]
        run_e2e(device, methods, batch, iters, warmup=warmup, pair=args.pair, out=args.out, note=args.note)
        return 0
    checkout = Path(__file__).resolve().parents[1]  # the op benchmarks are a source checkout's, not the package's
    if not (checkout / "benchmarks" / "run.py").is_file():
        from kdfast.engine import ConfigError

        raise ConfigError(
            "the op benchmarks run from a source checkout (benchmarks/ next to kdfast/, an editable "
            "install); --e2e works anywhere"
        )
    argv = [
        "--device",
        device.type,
        *(["--quick"] if args.quick else []),
        *(["--out", str(args.out.resolve())] if args.out else []),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=checkout).returncode


def _viz_from_models(args: argparse.Namespace, device: str):
    """The teacher and a plain Distiller around the student (its inspect: AT maps of both), and the loaders."""
    from kdfast import models
    from kdfast.data import build_loaders
    from kdfast.distillers import Distiller, Params
    from kdfast.engine import ConfigError

    missing = [flag for flag in ("teacher", "teacher_checkpoint", "student", "student_checkpoint") if getattr(args, flag) is None]
    if missing:
        raise ConfigError(
            "viz needs --config, or all of --teacher, --teacher-checkpoint, --student, --student-checkpoint; "
            f"missing: {', '.join('--' + flag.replace('_', '-') for flag in missing)}"
        )
    dataset = args.dataset or "digits"
    _check_data(dataset, args.data_root)
    _check_checkpoint(args.teacher, args.teacher_checkpoint)
    _check_checkpoint(args.student, args.student_checkpoint)
    loaders = build_loaders(dataset, args.data_root, args.images, device)
    teacher, student = (
        models.create(name, loaders.num_classes, weights=path, dataset=dataset).to(device)
        for name, path in ((args.teacher, args.teacher_checkpoint), (args.student, args.student_checkpoint))
    )
    return Distiller(student, teacher, Params()), teacher, loaders


def _viz_from_config(args: argparse.Namespace, device: str):
    """The distiller of a training config with its trained state (last.pt or --checkpoint), its
    teacher, the loaders. The distiller is built as ``kdfast train`` builds it (``build_run``) from
    the config's own student (its ``runs``, if any, are not drawn)."""
    import dataclasses

    import torch

    from kdfast.data import build_loaders
    from kdfast.engine import ConfigError, checkpoint, load_config
    from kdfast.engine.assembly import build_run
    from kdfast.engine.trainer import LAST

    given = [
        flag
        for flag in ("teacher", "teacher_checkpoint", "student", "student_checkpoint", "dataset")
        if getattr(args, flag) is not None
    ]
    if given:
        raise ConfigError(
            f"--config takes the models and data from the config; drop "
            f"{', '.join('--' + flag.replace('_', '-') for flag in given)} (or use --set)"
        )
    cfg = load_config(args.config, [*args.set, *([f"data.root={args.data_root}"] if args.data_root else [])])
    path = Path(args.checkpoint) if args.checkpoint else Path(cfg.train.out_dir) / LAST
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} not found")
    state = checkpoint.load(path)
    if "distiller" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} has no 'distiller' state (a run's last.pt has one)")
    loaders = build_loaders(cfg.data.dataset, cfg.data.root, args.images, device)
    run = build_run(dataclasses.replace(cfg, runs=[]), torch.device(device), loaders.num_classes)
    distiller = run.students[0].distiller
    distiller.load_state_dict(state["distiller"])
    return distiller, run.teacher, loaders


def _viz(args: argparse.Namespace) -> int:
    from kdfast.engine.viz import inspect_grid

    device = args.device or "cpu"
    build = _viz_from_config if args.config is not None else _viz_from_models
    distiller, teacher, loaders = build(args, device)
    images, labels = next(iter(loaders.test))
    out = inspect_grid(distiller, teacher, images, labels, Path(args.out))
    print(f"{type(distiller).__name__} maps written to {out}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    import torch

    from kdfast.engine import quickstart

    torch.set_num_threads(args.threads)
    quickstart.run(args.out_dir, args.epochs, progress=not args.no_progress)
    return 0


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a teacher or distil a student from a YAML config",
        description="Train by a YAML config (a path, or one shipped under kdfast/configs, e.g. "
        "cifar100/kd/resnet32x4_resnet8x4). Multi-GPU / multi-node: run under torchrun.",
    )
    p.add_argument("config", help="config file, e.g. digits/kd or cifar100/dkd/resnet32x4_resnet8x4.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set train.epochs=2 --set method.temperature=2",
    )
    p.add_argument("--teacher-checkpoint", help="teacher weights (mdistiller {'model': ...} or a state_dict)")
    p.add_argument("--data-root", help="dataset folder (data.root)")
    p.add_argument("--out-dir", help="output folder: checkpoints, metrics.jsonl, tensorboard/, curves.png, summary.json")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument(
        "--seeds",
        type=_seeds,
        metavar="S1,S2,...",
        help="train one student per seed (each of the config's runs, or its student, per seed) on one "
        "teacher forward per batch and one data order (train.data_seed, default train.seed)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (train.device)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact reruns, slower)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student step")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt exactly")
    p.set_defaults(func=_train)


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="top-1 accuracy of a checkpoint on a dataset's test split")
    p.add_argument("--model", required=True, help="model name, e.g. resnet8x4")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (kdfast best.pt/last.pt, mdistiller, state_dict)")
    p.add_argument("--dataset", default="digits", help="digits, cifar10, cifar100 or imagenet (default: digits)")
    p.add_argument("--data-root", help="dataset folder (not needed for digits)")
    p.add_argument("--batch-size", type=int, default=256, help="default: 256")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="autocast (default: bf16 on GPU)")
    p.set_defaults(func=_eval)


def _add_bench(commands) -> None:
    from kdfast.engine.e2e_methods import METHODS

    p = commands.add_parser(
        "bench",
        help="op benchmarks (from a checkout) or --e2e training-step throughput",
        description="Without --e2e: the op benchmarks of benchmarks/run.py. With --e2e: images/s "
        "of a resnet32x4 -> resnet8x4 distillation step, kdfast vs an eager fp32 "
        "peer-style baseline. Rows are merged into benchmarks/results/<device>.csv.",
    )
    p.add_argument("--e2e", action="store_true", help="end-to-end distillation step instead of single ops")
    p.add_argument("--quick", action="store_true", help="few shapes / small batch and few steps (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="--e2e methods (default: all; kd with --students)")
    p.add_argument(
        "--pair",
        choices=("cifar100", "imagenet"),
        default="cifar100",
        help="--e2e: resnet32x4 -> resnet8x4 on 32x32 images (cifar100, default) or ResNet34 -> ResNet18 on 224x224 "
        "(imagenet; every method but afd)",
    )
    p.add_argument(
        "--students",
        nargs="+",
        type=int,
        metavar="N",
        help="--e2e: images/s per student of N students on one teacher forward vs N separate runs, for each N (e.g. 1 2 4)",
    )
    p.add_argument("--batch", type=int, help="--e2e batch size (default 64, 8 with --quick)")
    p.add_argument("--iters", type=int, help="--e2e timed steps (default 20, 3 with --quick)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, help="CSV to merge into (default: benchmarks/results/<device>.csv)")
    p.add_argument("--note", default="", help="--e2e: text for the rows' note column (e.g. the machine's load)")
    p.set_defaults(func=_bench)


def _add_viz(commands) -> None:
    p = commands.add_parser(
        "viz",
        help="PNG grid of what a method transfers (Distiller.inspect) on a few test images",
        description="Two modes. --config: the distiller of a training config with its trained state "
        "(<out_dir>/last.pt or --checkpoint), drawing its inspect() maps (AFT's blocks, "
        "AFD's attention weights, ...). Otherwise: teacher vs student attention maps of "
        "two model checkpoints (--teacher, --teacher-checkpoint, --student, "
        "--student-checkpoint).",
    )
    p.add_argument("--config", help="training config (a path or a shipped name, e.g. cifar100/aft/resnet32x4_resnet8x4)")
    p.add_argument("--checkpoint", help="--config mode: checkpoint with a 'distiller' state (default: <out_dir>/last.pt)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="--config mode: override a config value (repeatable)",
    )
    p.add_argument("--teacher", help="model mode: teacher model name")
    p.add_argument("--teacher-checkpoint", help="model mode: teacher checkpoint file")
    p.add_argument("--student", help="model mode: student model name")
    p.add_argument("--student-checkpoint", help="model mode: student checkpoint file")
    p.add_argument("--dataset", help="model mode: dataset of the test images (default: digits)")
    p.add_argument("--data-root", help="dataset folder (not needed for digits; --config mode: data.root)")
    p.add_argument("--images", type=int, default=4, help="number of images (default: 4)")
    p.add_argument("--device", help="default: cpu")
    p.add_argument("--out", default="attention.png", help="PNG file (default: attention.png)")
    p.set_defaults(func=_viz)


def _add_quickstart(commands) -> None:
    p = commands.add_parser(
        "quickstart",
        help="train a teacher, then students with and without distillation, on digits",
        description="What distillation buys, on the embedded digits dataset: a resnet14 teacher "
        "(configs digits/teacher), then resnet8 students without a teacher, with fused KD "
        "and with fused AT, three seeds each, on one teacher forward per batch "
        "(digits/students); prints mean ± std over seeds per method.",
    )
    p.add_argument("--out-dir", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the configs', 12 and 24)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default: 1, robust on a busy machine; 2 is faster on an idle 2-core one)",
    )
    p.set_defaults(func=_quickstart)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fused knowledge-distillation kernels for vision models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the AT loss through every available backend and compare with the reference")
    demo.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"], help="feature dtype")
    demo.add_argument("--repeats", type=int, default=5, help="timed repetitions per backend (default: 5)")
    demo.set_defaults(func=_demo)
    for add in (_add_train, _add_eval, _add_bench, _add_viz, _add_quickstart):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from kdfast.engine import ConfigError

    try:
        return args.func(args)
    except ConfigError as error:
        parser.exit(2, f"kdfast: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
