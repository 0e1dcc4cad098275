"""The `kdfast` command line."""

from __future__ import annotations

import argparse
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from kdfast import demo

    rows = demo.run(batch=args.batch, device=args.device, dtype=args.dtype, repeats=args.repeats)
    return 0 if rows else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fused knowledge-distillation kernels for vision models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the AT loss through every available backend and compare with the reference")
    demo.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"], help="feature dtype")
    demo.add_argument("--repeats", type=int, default=5, help="timed repetitions per backend (default: 5)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
