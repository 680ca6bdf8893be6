"""Compiled artifacts: an AOTInductor ``.pt2`` package with a manifest beside it (``<name>.pt2.json``).

The manifest holds the package's SHA-256 and what its inputs must be. ``torch._inductor.aoti_load_package``
checks neither: it runs a corrupted package, reads past an input of the wrong size and reads an input of
other strides (a slice, ``channels_last``) as if it were laid out as compiled. :func:`load` checks the
SHA-256, checks the manifest against the record of the inputs the package carries, refuses archive members
that would be extracted outside the loader's folder, and lays inputs out as compiled; the backend's compile
cache (:mod:`mergepass.cache`) stores its entries this way.

Loading a package runs its shared library's code, as with any AOTInductor package: load only packages you
trust. The SHA-256 guards against damage, not against whoever can write the package and its manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import compat
from .decide import version  # re-exported: manifests and the compile cache name it
from .lower import INPUTS_KEY, compile_package

FORMAT = 2  # 2: inputs carry their strides, and the package its own record of them


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
    """The manifest beside the package at ``path``; ValueError, naming the problem, unless it is well formed."""
    mf = manifest_path(path)
    if not mf.is_file():
        raise ValueError(f"{path}: no manifest {mf.name} beside it, so the package cannot be verified; "
                         "keep the two files together (or load it unverified with torch._inductor.aoti_load_package)")
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        raise ValueError(f"{mf}: not a mergepass manifest (not JSON: {e})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise ValueError(f"{mf}: not a valid mergepass manifest: {problem}")
    return manifest


def manifest_problem(manifest: Any) -> Optional[str]:
    """What is wrong with a manifest's structure (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"a JSON object is expected, got {type(manifest).__name__}"
    if manifest.get("format") != FORMAT:
        return (f"format {manifest.get('format')!r}, where this mergepass reads format {FORMAT}; export the "
                "package again with this version")
    if not (isinstance(manifest.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", manifest["sha256"])):
        return "'sha256' must be a SHA-256 digest (64 hex digits)"
    if not isinstance(manifest.get("meta", {}), dict):
        return "'meta' must be a JSON object"
    inputs = manifest.get("inputs")
    if not isinstance(inputs, list):
        return f"'inputs' must be a list of input specs, got {json.dumps(inputs)}"
    for i, spec in enumerate(inputs):
        problem = _input_problem(spec)
        if problem:
            return f"inputs[{i}]: {problem}"
    return None


def _sizes(value: Any) -> bool:
    """Whether ``value`` is a list of sizes: whole numbers >= 0, or None where symbolic."""
    return isinstance(value, list) and all(v is None or (type(v) is int and v >= 0) for v in value)


def _input_problem(spec: Any) -> Optional[str]:
    if not isinstance(spec, dict):
        return f"a JSON object is expected, got {json.dumps(spec)}"
    missing = [k for k in ("shape", "stride", "dtype", "device") if k not in spec]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    if not _sizes(spec["shape"]) or not _sizes(spec["stride"]) or len(spec["stride"]) != len(spec["shape"]):
        return "'shape' and 'stride' must be lists of the same length of whole numbers (null where symbolic)"
    if not (isinstance(spec["dtype"], str) and isinstance(getattr(torch, spec["dtype"], None), torch.dtype)):
        return f"'dtype' must name a torch dtype, got {json.dumps(spec['dtype'])}"
    if not isinstance(spec["device"], str):
        return f"'device' must be a device type such as \"cpu\", got {json.dumps(spec['device'])}"
    return None


def _describe(spec: dict) -> str:
    return f"{spec['dtype']} of shape {_shape(spec['shape'])} and strides {_shape(spec['stride'])} on {spec['device']}"


def _shape(dims: Sequence) -> str:
    return "(" + ", ".join("any" if d is None else str(d) for d in dims) + ")"


def _outside(name: str) -> bool:
    """Whether an archive member's name leads outside the folder it is extracted to (absolute, a drive, or ``..``)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) is not None or ".." in parts


def recorded_inputs(path: str | os.PathLike) -> list[dict]:
    """The inputs the package at ``path`` was compiled for, as the package itself records them (its AOTInductor
    metadata). ValueError for an archive member that would be extracted outside the loader's folder
    (``torch._inductor.aoti_load_package`` writes it there), and for a package without the record."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = next((n for n in names if _outside(n)), None)
            metadata = [z.read(n) for n in names
                        if bad is None and n.endswith("_metadata.json") and "/aotinductor/" in n]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable AOTInductor package ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ValueError(f"{path}: archive member {bad!r} would be written outside the folder the package is "
                         "extracted to; refusing to load it")
    records = {_record(m) for m in metadata} - {None}
    if len(records) != 1:
        raise ValueError(f"{path}: the package holds {'conflicting records' if records else 'no record'} of its "
                         "inputs (packages of mergepass before manifest format 2 hold none); export it again")
    try:
        inputs = json.loads(records.pop())
    except ValueError:
        inputs = None  # reported as malformed below
    problem = manifest_problem({"format": FORMAT, "sha256": "0" * 64, "inputs": inputs})
    if problem:
        raise ValueError(f"{path}: the package's record of its inputs is malformed: {problem}")
    return inputs


def _record(metadata: bytes) -> Optional[str]:
    """The inputs' record (JSON text) in one AOTInductor metadata file; None where it holds none."""
    try:
        record = json.loads(metadata).get(INPUTS_KEY)
    except (ValueError, AttributeError):
        return None
    return record if isinstance(record, str) else None


def check_against_package(path: str | os.PathLike, manifest: dict) -> None:
    """ValueError unless the manifest's inputs are those the package was compiled for: an edited shape or dtype
    would make the package read past (or short of) its input."""
    want = recorded_inputs(path)
    have = manifest["inputs"]
    if len(have) != len(want):
        raise ValueError(f"{path}: its manifest lists {len(have)} input(s), but the package was compiled for "
                         f"{len(want)}; the manifest was edited or belongs to another package")
    for i, (h, w) in enumerate(zip(have, want)):
        if h != w:
            raise ValueError(f"{path}: its manifest says input {i} is {_describe(h)}, but the package was compiled "
                             f"for {_describe(w)}; the manifest was edited or belongs to another package")


def sources(path: str | os.PathLike) -> str:
    """What inductor lowered the graph to, as a package holds it: the generated C++ (wrapper and kernels) and
    the table of the ops it calls through the dispatcher (custom ops such as torchao's)."""
    with zipfile.ZipFile(path) as z:
        return "\n".join(z.read(n).decode(errors="replace") for n in sorted(z.namelist()) if n.endswith((".cpp", ".json")))


def check_finite(args: Sequence) -> None:
    """ValueError for a floating-point input holding NaN or inf (static int8 would return finite, meaningless
    outputs for it)."""
    for i, t in enumerate(args):
        # a finite sum settles it in one reduction; only a non-finite one (or an overflow) needs the full check
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t.sum()))
                and not bool(torch.isfinite(t).all())):
            raise ValueError(f"mergepass: input {i} holds NaN or inf values (check_inputs=True); static int8 would "
                             "have returned finite, meaningless outputs for them")


def laid_out(a: torch.Tensor, stride: Sequence[Optional[int]]) -> torch.Tensor:
    """``a`` in the memory layout a package was compiled for (``stride``; None where symbolic): its kernels index
    an input by those strides, so a view of other strides (a slice of a larger image, ``channels_last``) would be
    read wrong. A size of 0 or 1 makes its stride irrelevant; an input already laid out so is not copied."""
    if all(w is None or n <= 1 or w == s for w, s, n in zip(stride, a.stride(), a.shape)):
        return a
    if None in stride:  # symbolic strides: only the contiguous layout can be told apart from the record
        c = a.contiguous()
        if all(w is None or n <= 1 or w == s for w, s, n in zip(stride, c.stride(), a.shape)):
            return c
        raise ValueError(f"mergepass: an input of strides {tuple(a.stride())} cannot be laid out as the package "
                         f"was compiled for ({_shape(stride)})")
    return torch.empty_strided(a.shape, stride, dtype=a.dtype, device=a.device).copy_(a)


class Artifact:
    """A verified package: call it with the inputs it was built for (any batch size where the batch is
    dynamic, any strides: an input is copied into the layout the package was compiled for where it differs).
    ``check_inputs``: refuse inputs holding NaN or inf. Returns what the exported module returns."""

    def __init__(self, path: str | os.PathLike, manifest: dict, runner: Callable, *, check_inputs: bool = False):
        self.path, self.manifest, self._run = Path(path), manifest, runner
        self.check_inputs = check_inputs

    @property
    def run(self) -> Callable:
        """The package's own runner, without the input check (for callers that guard inputs themselves and
        pass them in the layout the package was compiled for)."""
        return self._run

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def check(self, args: Sequence) -> None:
        """Raise ValueError unless ``args`` are inputs this package can serve (in whatever strides)."""
        spec = self.manifest["inputs"]
        if len(args) != len(spec):
            raise ValueError(f"{self.path.name} takes {len(spec)} input(s), got {len(args)}")
        for i, (a, s) in enumerate(zip(args, spec)):
            want = _shape(s["shape"])
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"{self.path.name}: input {i} must be a tensor of shape {want}, got {type(a).__name__}")
            ok = a.dim() == len(s["shape"]) and all(d is None or d == n for d, n in zip(s["shape"], a.shape))
            if not ok or str(a.dtype).removeprefix("torch.") != s["dtype"] or a.device.type != s["device"]:
                raise ValueError(f"{self.path.name}: input {i} must be {s['dtype']} of shape {want} on {s['device']}, "
                                 f"got {str(a.dtype).removeprefix('torch.')} of shape {tuple(a.shape)} on "
                                 f"{a.device.type}")
            if any(d is None for d in s["shape"]) and 0 in a.shape:
                raise ValueError(f"{self.path.name}: input {i} is empty (shape {tuple(a.shape)})")
        if self.check_inputs:
            check_finite(args)

    def __call__(self, *args):
        self.check(args)
        return self._run(*(laid_out(a, s["stride"]) for a, s in zip(args, self.manifest["inputs"])))


def verified_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the package at ``path``; ValueError unless the package matches its SHA-256."""
    manifest = read_manifest(path)
    if file_digest(path) != manifest["sha256"]:
        raise ValueError(f"{path}: SHA-256 does not match its manifest: the file is corrupted or was changed")
    return manifest


def load(path: str | os.PathLike, *, verify: bool = True, check_inputs: bool = False) -> Artifact:
    """Load a package written by :func:`mergepass.export` (or the compile cache), first checking its SHA-256
    against the manifest and the manifest against the package's own record of its inputs; the returned
    :class:`Artifact` refuses inputs the package cannot serve (and, with ``check_inputs``, inputs holding NaN
    or inf, as ``mergepass.backend(..., check_inputs=True)`` does). ``verify=False`` skips only the SHA-256
    (for a caller that has just checked it). Loading runs the package's shared library: load only packages
    you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such package")
    manifest = verified_manifest(path) if verify else read_manifest(path)
    check_against_package(path, manifest)  # before loading: a package that fails runs none of its code
    model = compat.aoti_load_package(str(path))
    count = compat.aoti_input_count(model)
    if count is not None and count != len(manifest["inputs"]):
        raise ValueError(f"{path}: AOTInductor's call spec takes {count} input(s), but the manifest and the "
                         f"package's record list {len(manifest['inputs'])}")
    return Artifact(path, manifest, model, check_inputs=check_inputs)
