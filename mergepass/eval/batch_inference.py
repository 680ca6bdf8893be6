"""Outputs (logits or pooled features) for every image of a folder, written as Parquet with the file names.

The model is compiled once, on the driver, into a package (:func:`mergepass.export`: merged, int8 for
int8 recipes, any batch size). Workers only load it: in this process by default (:func:`run_local`),
or in a Ray Data actor pool (:func:`run_ray`, ``pip install 'mergepass[ray]'``), where each actor loads
the package once and never compiles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data import open_image

OUTPUTS = ("logits", "features")


class Features(torch.nn.Module):
    """A timm model's pooled pre-logits features (what its head would classify)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ValueError(f"--outputs features needs a timm model (forward_features/forward_head); "
                             f"{type(model).__name__} has none: use --outputs logits")
        self.model = model

    def forward(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def build_package(model: torch.nn.Module, recipe: str, path: str | os.PathLike, *, img_size: int,
                  calibration: Optional[Sequence[torch.Tensor]] = None, outputs: str = "logits", **overrides) -> Path:
    """Compile ``model`` (its logits, or :class:`Features`) once into a package serving any batch size."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    from ..export import export
    net = Features(model) if outputs == "features" else model
    example = calibration[0][:2] if calibration else torch.randn(2, 3, img_size, img_size)
    return export(net.eval(), example, recipe, path=path, calibration=calibration, **overrides)


def read_images(files: Sequence[str], prep: dict) -> tuple[list[str], torch.Tensor, list[str]]:
    """(files read, their images, files skipped): an unreadable image is skipped, not fatal."""
    ok, xs, skipped = [], [], []
    for f in files:
        try:
            xs.append(open_image(f, **prep))
            ok.append(str(f))
        except ValueError:
            skipped.append(str(f))
    return ok, (torch.stack(xs) if xs else torch.empty(0)), skipped


def check_finite(files: Sequence[str], x: torch.Tensor) -> None:
    """ValueError naming the first image whose preprocessed values include NaN or inf."""
    bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero()
    if len(bad):
        raise ValueError(f"image {files[int(bad[0])]} holds NaN or inf values once preprocessed (--check-inputs): "
                         "check the model's mean and std")


class Predictor:
    """Loads a package once; maps ``{"file": [...]}`` batches to ``{"file", "output"}`` (a Ray Data callable class).
    ``check_inputs``: refuse an image that preprocesses to NaN or inf, as ``mergepass.backend(check_inputs=True)``."""

    def __init__(self, package: str, prep: dict, check_inputs: bool = False):
        from .. import artifact
        torch.set_num_threads(int(os.environ.get("MERGEPASS_WORKER_THREADS", torch.get_num_threads())))
        self.model, self.prep, self.check_inputs = artifact.load(package), prep, check_inputs

    def __call__(self, batch: dict) -> dict:
        files, x, _ = read_images(list(batch["file"]), self.prep)
        if not files:
            return {"file": [], "output": []}
        if self.check_inputs:
            check_finite(files, x)
        with torch.no_grad():
            out = self.model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return {"file": files, "output": [row for row in out.float().numpy()]}


def run_local(package: str | os.PathLike, files: Sequence[str], prep: dict, batch_size: int,
              progress: bool = True, check_inputs: bool = False) -> tuple[list[str], list]:
    """(files, output rows) in this process, with a progress bar."""
    from tqdm import tqdm
    predict = Predictor(str(package), prep, check_inputs)
    names, rows = [], []
    chunks = range(0, len(files), batch_size)
    for i in tqdm(chunks, desc="images", unit="batch", disable=not progress):
        out = predict({"file": files[i:i + batch_size]})
        names += out["file"]
        rows += out["output"]
    return names, rows


def run_ray(package: str | os.PathLike, files: Sequence[str], prep: dict, batch_size: int,
            workers: int, check_inputs: bool = False) -> tuple[list[str], list]:
    """(files, output rows) from a Ray Data actor pool of ``workers`` actors, each loading the package once."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RuntimeError("--engine ray needs Ray Data: pip install 'mergepass[ray]'") from e
    if not ray.is_initialized():
        ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items([{"file": str(f)} for f in files])
    kwargs = {"package": str(package), "prep": prep, "check_inputs": check_inputs}
    out = ds.map_batches(Predictor, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                         concurrency=workers)
    rows = out.take_all()
    order = {str(f): i for i, f in enumerate(files)}
    rows.sort(key=lambda r: order[str(r["file"])])
    return [str(r["file"]) for r in rows], [r["output"] for r in rows]


def write_parquet(files: Sequence[str], rows: Sequence, path: str | os.PathLike) -> Path:
    """One row per image: ``file`` (string) and ``output`` (list of float32)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError("writing Parquet needs pyarrow: pip install 'mergepass[ray]' (or pyarrow)") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"file": pa.array([str(f) for f in files], pa.string()),
                      "output": pa.array([list(map(float, r)) for r in rows], pa.list_(pa.float32()))})
    pq.write_table(table, path)
    return path
