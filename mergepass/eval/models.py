"""Build models by name without downloading anything (timm first; torchvision as ``tv:NAME``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import close_names


def create(name: str, img_size: Optional[int] = None, checkpoint: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """An eval-mode model with random weights (or ``checkpoint``'s). Unknown name: ValueError with close matches.
    Random weights are drawn from seed 0, leaving the caller's random state as it was: a run reproduces, and
    the compile cache serves the next one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _create(name, img_size, **kwargs)
    if checkpoint:
        load_checkpoint(model, checkpoint, name)
    return model.eval()


def _create(name: str, img_size: Optional[int], **kwargs) -> torch.nn.Module:
    if name.startswith("tv:"):
        return _torchvision(name[3:], img_size, **kwargs)
    import timm
    if not timm.is_model(name):
        close = close_names(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    return timm.create_model(name, pretrained=False, **kwargs)


def _torchvision(name: str, img_size: Optional[int], **kwargs) -> torch.nn.Module:
    import torchvision.models as tvm
    if name not in tvm.list_models():
        close = close_names(name, tvm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"unknown torchvision model {name!r}" + (f"; close matches: {', '.join(close)}" if close else ""))
    if img_size is not None:
        kwargs["image_size"] = img_size
    try:
        return tvm.get_model(name, weights=None, **kwargs)
    except AssertionError as e:  # torchvision asserts on an image size its patches do not divide
        raise ValueError(f"torchvision model {name!r} with image size {img_size}: {e}") from None


def load_checkpoint(model: torch.nn.Module, path: str, name: str = "") -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as e:  # noqa: BLE001 - every reader failure means "not a readable checkpoint"
        raise ValueError(f"checkpoint {p} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {p} holds a {type(state).__name__}, not a state dict")
    misfit = _misfit(model.state_dict(), state)
    if misfit:
        raise ValueError(f"checkpoint {p} does not fit model {name or type(model).__name__}: {misfit}")
    model.load_state_dict(state, strict=True)


def _misfit(want: dict, got: dict, show: int = 3) -> str:
    """Why state dict ``got`` does not load into a model whose own is ``want``, in one line ('' if it does)."""
    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")
    missing, unexpected = want.keys() - got.keys(), got.keys() - want.keys()
    shapes = [k for k in want.keys() & got.keys()
              if hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(want[k].shape)]
    why = [f"{len(missing)} missing keys ({some(missing)})"] if missing else []
    why += [f"{len(unexpected)} unexpected keys ({some(unexpected)})"] if unexpected else []
    why += [f"{k} is {list(got[k].shape)} in the checkpoint, {list(want[k].shape)} in the model"
            for k in sorted(shapes)[:show]]
    return "; ".join(why)


def patch_size(model: torch.nn.Module) -> int:
    """The side of a model's square patches (timm, torchvision, transformers; 0 when unknown)."""
    cfg = getattr(model, "config", None)
    p = getattr(cfg, "patch_size", None) or getattr(getattr(model, "patch_embed", None), "patch_size", None) \
        or getattr(model, "patch_size", None)
    p = p[0] if isinstance(p, (tuple, list)) else p
    return int(p) if isinstance(p, int) else 0


def input_size(model: torch.nn.Module) -> int:
    """The square input resolution a model was built for (timm, torchvision, transformers; 224 otherwise)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "image_size", None):
        return int(cfg.image_size)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return int(pe.img_size[0])
    return int(getattr(model, "image_size", 224))
