"""What the experiment runners that train on the device-held scene pool share: their common options, the
command they record, their entry point."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable


def common_options(parser: argparse.ArgumentParser, scenes: int) -> argparse.ArgumentParser:
    """The pool (scenes rendered, scenes per batch, the workers that render them), the held-out scoring, the
    learning rate's warm-up, the seed and the device."""
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenes", type=int, default=scenes, help="scenes rendered into the pool")
    parser.add_argument("--scenes-per-batch", type=int, default=86, help="each with its 3 questions")
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear warm-up before the cosine")
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    return parser


def command(module: str, args: argparse.Namespace) -> str:
    """The command that reproduces a run, for its results."""
    return f"python -m {module} " + shlex.join(args.argv)


def entry(parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], object],
          argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    run(args)
    return 0
