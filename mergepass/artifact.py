"""Compiled artifacts: an AOTInductor ``.pt2`` package with a manifest beside it (``<name>.pt2.json``).

The manifest holds the package's SHA-256 and what its inputs must be. ``torch._inductor.aoti_load_package``
checks neither: it runs a corrupted package and reads past an input of the wrong size. :func:`load`
checks both, and the backend's compile cache (:mod:`mergepass.cache`) stores its entries this way.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import compat
from .decide import version  # re-exported: manifests and the compile cache name it
from .lower import compile_package

FORMAT = 1


def manifest_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write(module: torch.nn.Module, example_inputs: Sequence, path: str | os.PathLike, *, meta: Optional[dict] = None,
          **compile_options: Any) -> Path:
    """Compile ``module`` into a package at ``path`` (:func:`~mergepass.lower.compile_package` options) and
    write its manifest; ``meta`` is stored in the manifest as it is (JSON)."""
    from .cpu import machine
    path, inputs = compile_package(module, example_inputs, path, **compile_options)
    manifest = {"format": FORMAT, "sha256": file_digest(path), "inputs": inputs, "mergepass": version(),
                "built_on": machine(), "meta": meta or {}}
    manifest_path(path).write_text(json.dumps(manifest, indent=1))
    return path


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a package and its manifest to ``dst`` (and ``dst``.json); returns ``dst``."""
    import shutil
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copyfile(manifest_path(src), manifest_path(dst))
    return dst


def read_manifest(path: str | os.PathLike) -> dict:
    mf = manifest_path(path)
    if not mf.is_file():
        raise ValueError(f"{path}: no manifest {mf.name} beside it, so the package cannot be verified; "
                         "keep the two files together (or load it unverified with torch._inductor.aoti_load_package)")
    try:
        manifest = json.loads(mf.read_text())
        manifest["sha256"], manifest["inputs"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{mf}: not a mergepass manifest ({e})") from None
    return manifest


def sources(path: str | os.PathLike) -> str:
    """What inductor lowered the graph to, as a package holds it: the generated C++ (wrapper and kernels) and
    the table of the ops it calls through the dispatcher (custom ops such as torchao's)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        return "\n".join(z.read(n).decode(errors="replace") for n in sorted(z.namelist()) if n.endswith((".cpp", ".json")))


class Artifact:
    """A verified package: call it with the inputs it was built for (any batch size where the batch is
    dynamic). Returns what the exported module returns."""

    def __init__(self, path: str | os.PathLike, manifest: dict, runner: Callable):
        self.path, self.manifest, self._run = Path(path), manifest, runner

    @property
    def run(self) -> Callable:
        """The package's own runner, without the input check (for callers that guard inputs themselves)."""
        return self._run

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def check(self, args: Sequence) -> None:
        """Raise ValueError unless ``args`` are inputs this package can serve."""
        spec = self.manifest["inputs"]
        if len(args) != len(spec):
            raise ValueError(f"{self.path.name} takes {len(spec)} input(s), got {len(args)}")
        for i, (a, s) in enumerate(zip(args, spec)):
            want = "(" + ", ".join("any" if d is None else str(d) for d in s["shape"]) + ")"
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"{self.path.name}: input {i} must be a tensor of shape {want}, got {type(a).__name__}")
            ok = a.dim() == len(s["shape"]) and all(d is None or d == n for d, n in zip(s["shape"], a.shape))
            if not ok or str(a.dtype).removeprefix("torch.") != s["dtype"] or a.device.type != s["device"]:
                raise ValueError(f"{self.path.name}: input {i} must be {s['dtype']} of shape {want} on {s['device']}, "
                                 f"got {str(a.dtype).removeprefix('torch.')} of shape {tuple(a.shape)} on "
                                 f"{a.device.type}")
            if any(d is None for d in s["shape"]) and 0 in a.shape:
                raise ValueError(f"{self.path.name}: input {i} is empty (shape {tuple(a.shape)})")

    def __call__(self, *args):
        self.check(args)
        return self._run(*args)


def verified_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the package at ``path``; ValueError unless the package matches its SHA-256."""
    manifest = read_manifest(path)
    if file_digest(path) != manifest["sha256"]:
        raise ValueError(f"{path}: SHA-256 does not match its manifest: the file is corrupted or was changed")
    return manifest


def load(path: str | os.PathLike, *, verify: bool = True) -> Artifact:
    """Load a package written by :func:`mergepass.export` (or the compile cache), first checking its SHA-256
    against the manifest; the returned :class:`Artifact` refuses inputs the package cannot serve."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such package")
    manifest = verified_manifest(path) if verify else read_manifest(path)
    return Artifact(path, manifest, compat.aoti_load_package(str(path)))
