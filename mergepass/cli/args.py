"""Command-line options shared by the commands: the model to load, recipe field overrides."""
from __future__ import annotations

import argparse


def model_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser with the options that name a model: --model, --checkpoint, --img-size."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name (or tv:NAME for torchvision)")
    p.add_argument("--checkpoint", default=None, help="weights (.safetensors or .pth)")
    p.add_argument("--img-size", type=int, default=224)
    return p


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
    p.add_argument("--r", type=int, help="tokens merged per merging block")
    p.add_argument("--skip", type=int, help="DFE: dense blocks at the start")
    p.add_argument("--window", type=int, help="LGTM: initial window side")
    p.add_argument("--transition", type=int, help="LGTM: number of local blocks")
    p.add_argument("--budget", type=_budget, help="ToMato: tokens removed (>=1) or fraction (<1)")
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")


def overrides_from(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in ("r", "skip", "window", "transition") if getattr(args, k, None) is not None}
    if getattr(args, "budget", None) is not None:
        out["budget"] = args.budget
    if getattr(args, "no_prop_attn", False):
        out["prop_attn"] = False
    return out
