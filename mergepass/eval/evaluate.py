"""Quality evaluation: a compressed model's outputs against the uncompressed FP32 model's."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..backend import backend
from ..fidelity import cosine, cosine_stats
from ..recipe import load, parse_spec
from . import data as data_mod
from . import models, peers


def feature_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Backbone metrics from token features [N, T, C] (or pooled [N, C])."""
    cls_o, cls_r = (out[:, 0], ref[:, 0]) if out.dim() == 3 else (out, ref)
    res = {f"cls_cos_{k}": v for k, v in cosine_stats(cosine(cls_o, cls_r)).items()}
    if out.dim() == 3:
        res["patch_cos_mean"] = cosine(out[:, 1:].mean(1), ref[:, 1:].mean(1)).mean().item()
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
               logit_cos_mean=cosine(out, ref).mean().item())
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
    """(callable, backend or None) for 'eager', 'inductor', a peer engine (:mod:`.peers`, exported for
    the shape of the first calibration batch) or a recipe spec like 'tome:merge.r=8' ('cache=false' turns the
    compile cache off; 'guards=skip-modules' compiles with dynamo's guards on the model's modules skipped)."""
    name, overrides = parse_spec(spec)
    if name == "eager":
        return model, None
    if name == "inductor":
        return torch.compile(model, dynamic=False), None
    if name in peers.PEERS:
        first = next(iter(calibration or []), None)
        if first is None:
            raise ValueError(f"{name} needs calibration batches (their shape is the one it is exported for)")
        return peers.build(name, model, first[0] if isinstance(first, (tuple, list)) else first, calibration,
                           overrides), None
    cache = overrides.pop("cache", None)  # 'int8:cache=false': the JIT compile, without the compile cache
    guards = overrides.pop("guards", "all")  # 'int8:guards=skip-modules': no dynamo guards on the modules
    if guards not in GUARDS:
        raise ValueError(f"spec {spec!r}: guards must be one of {sorted(GUARDS)}, got {guards!r}")
    be = backend(load(name, **overrides), calibration=calibration, cache=cache)
    options = {"guard_filter_fn": GUARDS[guards]} if GUARDS[guards] else None
    return torch.compile(model, backend=be, dynamic=False, options=options), be


# what dynamo guards on per call: everything (its default), or all but the model's modules (torch's
# skip_guard_on_all_nn_modules_unsafe: a user's choice, sound where the model is not changed after compiling)
GUARDS = {"all": None, "skip-modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


@dataclass
class EvalSet:
    """Images split for calibration and evaluation, and the uncompressed model's outputs on them."""

    target: torch.nn.Module        # what is compiled: the model, or its features for backbones
    backbone: bool
    calib: list[torch.Tensor]
    evals: list[torch.Tensor]
    labels: torch.Tensor
    ref: torch.Tensor
    skipped: int

    @property
    def images(self) -> int:
        return len(self.evals) * (len(self.evals[0]) if self.evals else 0)


def eval_set(model: torch.nn.Module, images: str, calib_images: int = 64, batch: int = 8, limit: Optional[int] = None,
             img_size: int = 224, preprocess: Optional[dict] = None, outputs: str = "tokens",
             split: str = "report") -> EvalSet:
    """Load ``images``; the first ``calib_images`` calibrate (and tune), the rest are evaluated (``split="tune"``:
    the calibration images themselves, to choose settings on without looking at the reported ones).

    ``preprocess``: overrides for :func:`mergepass.eval.data.data_config` (mean, std, crop_pct). ``outputs``: what a
    backbone is compiled to return: "tokens" (``forward_features``: class token and patch metrics) or "pooled" (its
    own forward, the pooled class token: the graph ``benchmarks/speed.py`` times, where the last block may compute
    that row alone)."""
    if outputs not in ("tokens", "pooled"):
        raise ValueError(f"outputs must be 'tokens' or 'pooled', got {outputs!r}")
    if split not in ("report", "tune"):
        raise ValueError(f"split must be 'report' or 'tune', got {split!r}")
    backbone = getattr(model, "num_classes", 1) == 0 and hasattr(model, "forward_features")
    target = Features(model).eval() if backbone and outputs == "tokens" else model
    x, labels, skipped = data_mod.load_images(images, **data_mod.data_config(model, img_size, **(preprocess or {})))
    if len(x) <= calib_images + batch:
        calib_images = 0  # tiny folders: calibrate on the evaluation images
    calib = data_mod.batches(x[:calib_images], batch) if calib_images else data_mod.batches(x, batch)
    x, labels = (x[:calib_images], labels[:calib_images]) if split == "tune" and calib_images else \
        (x[calib_images:], labels[calib_images:])
    if limit:
        x, labels = x[:limit], labels[:limit]
    evals = data_mod.batches(x, batch)
    return EvalSet(target, backbone, calib, evals, labels[:len(evals) * batch], run_batches(target, evals), skipped)


def evaluate_spec(es: EvalSet, spec: str, compiled_as: Optional[str] = None):
    """Compile ``spec`` (as ``compiled_as`` when given) and compare it with the reference outputs:
    (row of metrics, compiled callable, backend or None)."""
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fn, be = compile_spec(es.target, compiled_as or spec, es.calib)
    with torch.no_grad():
        fn(es.evals[0])
    row = dict(recipe=spec, images=es.images, skipped=es.skipped, compile_s=time.perf_counter() - t0)
    out = run_batches(fn, es.evals)
    row.update(feature_metrics(out, es.ref) if es.backbone else classifier_metrics(out, es.ref, es.labels))
    schedule = be.schedule if be is not None else getattr(fn, "schedule", None)  # a merged peer's too
    if schedule is not None:
        row.update(macs_ratio=schedule.macs_ratio, final_tokens=schedule.final_tokens)
    if be is not None and be.quantized:
        row["fp32_linears"] = sorted({k for q in be.quantized for k in q.kept_fp32})
    return row, fn, be


def evaluate_recipes(model_name: str, checkpoint: Optional[str], images: str, recipes: Sequence[str],
                     img_size: int = 224, limit: Optional[int] = None, calib_images: int = 64, batch: int = 8,
                     log: Callable = print, model: Optional[torch.nn.Module] = None,
                     preprocess: Optional[dict] = None, split: str = "report") -> list[dict]:
    """Compile each recipe, run it over the held-out images (``split="tune"``: the calibration images), compare
    with eager FP32. One row per recipe."""
    model = model if model is not None else load_model(model_name, checkpoint, img_size)
    es = eval_set(model, images, calib_images, batch, limit, img_size, preprocess, split=split)
    log(f"{model_name}: {es.images} images evaluated ({es.skipped} unreadable skipped), "
        f"{len(es.calib) * batch} for calibration, {'backbone' if es.backbone else 'classifier'} metrics")
    rows = []
    for spec in recipes:
        rows.append(evaluate_spec(es, spec)[0])
        log("  " + format_rows(rows[-1:], header=False))
    return rows


def format_rows(rows: Sequence[dict], header: bool = True) -> str:
    keys = [k for k in ("cls_cos_mean", "cls_cos_p5", "cls_cos_min", "patch_cos_mean", "nn_agree",
                        "top1_agree", "top1_acc", "logit_cos_mean", "macs_ratio") if any(k in r for r in rows)]
    lines = [f"{'recipe':<26}" + "".join(f"{k:>15}" for k in keys)] if header else []
    for r in rows:
        lines.append(f"{r['recipe']:<26}" + "".join(
            f"{r[k]:>15.4f}" if isinstance(r.get(k), float) else f"{'-':>15}" for k in keys))
    return "\n".join(lines)
