"""Quality evaluation: a compressed model's outputs against the uncompressed FP32 model's."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import data as data_mod
from . import models
from .fidelity import cosine_stats


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def feature_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Backbone metrics from token features [N, T, C] (or pooled [N, C])."""
    cls_o, cls_r = (out[:, 0], ref[:, 0]) if out.dim() == 3 else (out, ref)
    res = {f"cls_cos_{k}": v for k, v in cosine_stats(_cos(cls_o, cls_r)).items()}
    if out.dim() == 3:
        res["patch_cos_mean"] = _cos(out[:, 1:].mean(1), ref[:, 1:].mean(1)).mean().item()
    res["nn_agree"] = nn_agreement(cls_o, cls_r)
    return res


def nn_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of samples whose nearest neighbour (cosine, among the others) is unchanged."""
    def nn(x):
        x = torch.nn.functional.normalize(x.float(), dim=-1)
        s = x @ x.T
        s.fill_diagonal_(-2)
        return s.argmax(-1)
    return (nn(out) == nn(ref)).float().mean().item()


def classifier_metrics(out: torch.Tensor, ref: torch.Tensor, labels: Optional[torch.Tensor]) -> dict:
    res = dict(top1_agree=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
               logit_cos_mean=_cos(out, ref).mean().item())
    if labels is not None and (labels >= 0).all():
        res["top1_acc"] = (out.argmax(-1) == labels).float().mean().item()
        res["top1_acc_ref"] = (ref.argmax(-1) == labels).float().mean().item()
    return res


def run_batches(fn: Callable, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(b) for b in batches])


def load_model(name: str, checkpoint: Optional[str], img_size: int = 224):
    kw = {"img_size": img_size}
    if "dinov2" in name and checkpoint:
        kw["num_classes"] = 0
    return models.create(name, checkpoint=checkpoint, **kw)


class Features(torch.nn.Module):
    """``forward_features`` as the forward (token features, for backbones without a head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def compile_spec(model: torch.nn.Module, spec: str, calibration=None):
    """(callable, backend or None) for 'eager', 'inductor' or a recipe spec like 'tome:r=8'."""
    import mergepass
    from .recipe import parse_spec
    name, overrides = parse_spec(spec)
    if name == "eager":
        return model, None
    if name == "inductor":
        return torch.compile(model, dynamic=False), None
    be = mergepass.backend(mergepass.load_recipe(name, **overrides), calibration=calibration)
    return torch.compile(model, backend=be, dynamic=False), be


def evaluate_recipes(model_name: str, checkpoint: Optional[str], images: str, recipes: Sequence[str],
                     img_size: int = 224, limit: Optional[int] = None, calib_images: int = 64, batch: int = 8,
                     log: Callable = print, model: Optional[torch.nn.Module] = None,
                     preprocess: Optional[dict] = None) -> list[dict]:
    """Compile each recipe, run it over the images, compare with eager FP32. One row per recipe.

    ``preprocess``: overrides for :func:`mergepass.data.data_config` (mean, std, crop_pct)."""
    model = model if model is not None else load_model(model_name, checkpoint, img_size)
    backbone = getattr(model, "num_classes", 1) == 0 and hasattr(model, "forward_features")
    target = Features(model).eval() if backbone else model
    cfg = data_mod.data_config(model, img_size, **(preprocess or {}))
    x, labels, skipped = data_mod.load_images(images, **cfg)
    if len(x) <= calib_images + batch:
        calib_images = 0  # tiny folders: calibrate on the evaluation images
    calib = data_mod.batches(x[:calib_images], batch) if calib_images else data_mod.batches(x, batch)
    x, labels = x[calib_images:], labels[calib_images:]
    if limit:
        x, labels = x[:limit], labels[:limit]
    evals = data_mod.batches(x, batch)
    n = len(evals) * batch
    labels = labels[:n]
    log(f"{model_name}: {n} images evaluated ({skipped} unreadable skipped), "
        f"{len(calib) * batch} for calibration, {'backbone' if backbone else 'classifier'} metrics")
    ref = run_batches(target, evals)
    rows = []
    for spec in recipes:
        torch._dynamo.reset()
        fn, be = compile_spec(target, spec, calib)
        out = run_batches(fn, evals)
        row = dict(recipe=spec, images=n, skipped=skipped)
        row.update(feature_metrics(out, ref) if backbone else classifier_metrics(out, ref, labels))
        if be is not None and be.schedule is not None:
            row["macs_ratio"] = be.schedule.macs_ratio
            row["final_tokens"] = be.schedule.final_tokens
        if be is not None and be.quantized:
            row["fp32_linears"] = sorted({k for q in be.quantized for k in q.kept_fp32})
        rows.append(row)
        log("  " + format_rows([row], header=False))
    return rows


def format_rows(rows: Sequence[dict], header: bool = True) -> str:
    keys = [k for k in ("cls_cos_mean", "cls_cos_p5", "cls_cos_min", "patch_cos_mean", "nn_agree",
                        "top1_agree", "top1_acc", "logit_cos_mean", "macs_ratio") if any(k in r for r in rows)]
    lines = [f"{'recipe':<26}" + "".join(f"{k:>15}" for k in keys)] if header else []
    for r in rows:
        lines.append(f"{r['recipe']:<26}" + "".join(
            f"{r[k]:>15.4f}" if isinstance(r.get(k), float) else f"{'-':>15}" for k in keys))
    return "\n".join(lines)
