"""Command-line options shared by the commands: the model to load, recipe field overrides, and how a
command reports a user's mistake (one ``error: ...`` line on stderr, exit code 2)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

MAX_BATCH = 4096  # beyond this a CPU batch is a typo, and would only fail later, out of memory

# a missing, unreadable or malformed file, a bad flag or recipe field: said in one line, not a traceback
USER_ERRORS = (ValueError, OSError)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors said in one line (the usage is in --help)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser(prog: str, doc: str) -> Parser:
    return Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def model_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser with the options that name a model: --model, --checkpoint, --img-size."""
    p = parser(prog, doc)
    p.add_argument("--model", required=True, help="timm model name (or tv:NAME for torchvision)")
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors or .pth)")
    p.add_argument("--img-size", type=positive, default=224)
    return p


def run(body: Callable[[], int]) -> int:
    """A command's body, with a user error printed as one ``error: ...`` line and exit code 2."""
    try:
        return body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def positive(text: str) -> int:
    """A whole number >= 1 (image counts, sizes, rounds)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def batch(text: str) -> int:
    """A batch size in [1, MAX_BATCH]."""
    v = positive(text)
    if v > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH}, got {v}")
    return v


def check_img_size(model, img_size: int) -> None:
    """ValueError naming --img-size when an image is smaller than one of the model's patches."""
    from ..eval.models import patch_size
    p = patch_size(model)
    if p and img_size < p:
        raise ValueError(f"--img-size {img_size} is smaller than one {p}-pixel patch of the model")


def check_out(path: str | Path, flag: str = "--out") -> None:
    """ValueError naming ``flag`` when ``path`` cannot be written: a folder, or under a regular file.
    Checked before the work that precedes the write (compiling, searching)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder, not a file")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {p}: {parent} is a file, not a folder")
            break


def _budget(text: str):
    """ToMato's budget: a whole number of tokens (>= 1) or a fraction of the patch tokens (< 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number") from None
    if v < 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"budget {text} must be a whole number of tokens (>= 1) "
                                         "or a fraction of the patch tokens in [0, 1)")
    return int(v) if v >= 1 else v


def add_override_args(p: argparse.ArgumentParser) -> None:
    """Flags for fields of the recipe's [merge] table, each named as its field."""
    p.add_argument("--r", type=int, help="tokens merged per merging block")
    p.add_argument("--skip", type=int, help="ToMe, DFE: dense blocks at the start")
    p.add_argument("--merge-block", type=int, help="ToMato: the one merging block")
    p.add_argument("--window", type=int, help="LGTM: initial window side")
    p.add_argument("--transition", type=int, help="LGTM: number of local blocks")
    p.add_argument("--budget", type=_budget, help="ToMato: tokens removed (>=1) or fraction (<1)")
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")


def overrides_from(args: argparse.Namespace) -> dict:
    """The [merge] fields the flags set, as recipe overrides."""
    merge = {k: getattr(args, k) for k in ("r", "skip", "merge_block", "window", "transition", "budget")
             if getattr(args, k, None) is not None}
    if getattr(args, "no_prop_attn", False):
        merge["prop_attn"] = False
    return {"merge": merge} if merge else {}
