"""The compile cache: int8 graphs compiled once, as verified AOTInductor packages, reused by later processes.

Inductor's own caches skip int8 graphs (their frozen weights are oneDNN tensors, which it cannot hash),
so each process would calibrate and compile again. An entry is keyed by everything its result depends
on: the merged graph's code and input shapes, the values of its weights, the resolved recipe, a digest
of the calibration data, the torch, torchao and mergepass versions (with a digest of mergepass's
sources) and the CPU. An entry is a directory written whole or not at all; its package is checked
against its SHA-256 before it is loaded.

It lives in ``$MERGEPASS_CACHE_DIR``, by default ``mergepass/`` in inductor's cache directory (so
clearing inductor's cache clears it too). ``MERGEPASS_CACHE=0`` or ``mergepass.backend(..., cache=False)``
turns it off; ``python -m mergepass.cache --clear`` empties it.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from . import artifact, compat
from . import decide

PACKAGE = "model.pt2"


def enabled() -> bool:
    return os.environ.get("MERGEPASS_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def serves(example_inputs: Sequence, on: Optional[bool] = None) -> bool:
    """Whether a compile of these inputs goes through the cache: ``on`` (None: :func:`enabled`), on the CPU."""
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    return (on if on is not None else enabled()) and on_cpu


def cache_dir() -> Path:
    env = os.environ.get("MERGEPASS_CACHE_DIR")
    if env:
        return Path(env)
    return Path(compat.inductor_cache_dir()) / "mergepass"


@functools.cache
def _source_digest() -> str:
    """mergepass's own code: an edited pass must not be served a graph the old one compiled."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*")):
        if f.suffix in (".py", ".cpp", ".toml") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _versions() -> dict:
    from .cpu import cpu_id
    try:
        import torchao
        ao = torchao.__version__
    except ImportError:
        ao = None
    return {"torch": torch.__version__, "torchao": ao, "mergepass": artifact.version(), "sources": _source_digest(),
            "cpu": cpu_id()}


def _update_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{tuple(t.shape)}{t.dtype}{t.device.type}".encode())
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)


def tensors_digest(tensors: Iterable) -> str:
    """SHA-256 of tensors' shapes, dtypes and values (other items by their repr)."""
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            _update_tensor(h, t)
        elif isinstance(t, (tuple, list)):
            h.update(tensors_digest(t).encode())
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"T{tuple(str(d) for d in v.shape)}{tuple(str(s) for s in v.stride())}{v.dtype}{v.device.type}"
    return repr(v)


_PER_BUILD = ("aot_inductor.metadata", "aot_inductor.output_path", "aot_inductor.serialized_in_spec",
              "aot_inductor.serialized_out_spec")


def _identity(p: Any) -> Optional[str]:
    if p is None:
        return ""
    return p.uuid() if isinstance(p, compat.custom_graph_pass()) and p.uuid() else None


def _inductor_settings() -> Optional[str]:
    """Inductor's settings as they stand (a caller may have patched them); None when a custom pass
    without a stable identity is set, whose effect no key can capture."""
    from torch._inductor import config as inductor_config
    passes = {}
    for name in compat.INDUCTOR_CUSTOM_PASSES:
        value = getattr(inductor_config, name, None)
        ids = [_identity(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if None in ids:
            return None
        passes[name] = ids
    settings = {k: v for k, v in inductor_config.save_config_portable().items() if k not in _PER_BUILD}
    return json.dumps({"settings": settings, "passes": passes}, sort_keys=True, default=repr)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    """A get_attr node's value (dotted targets reach into submodules); None if absent."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def graph_key(gm: fx.GraphModule, example_inputs: Sequence, recipe: dict, calibration: Optional[Sequence],
              extra: Optional[dict] = None) -> Optional[str]:
    """The key of a graph's compiled result: its code, inputs (shapes; values of module state), the
    constants it holds, the recipe, the calibration data, inductor's settings, versions and CPU.
    None when no key can capture what the result depends on (a custom inductor pass is set)."""
    settings = _inductor_settings()
    if settings is None:
        return None
    from .graph.lift import Inputs
    inputs = Inputs(gm, example_inputs)
    state = [example_inputs[i] for i in sorted(inputs.const)]
    attrs = [v for v in (_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")
             if isinstance(v, torch.Tensor)]
    parts = {"code": gm.code, "inputs": [_describe(v) for v in example_inputs], "state": tensors_digest(state + attrs),
             "recipe": recipe, "calibration": None if calibration is None else tensors_digest(calibration),
             "inductor": settings, "grad": torch.is_grad_enabled(), "versions": _versions(), "extra": extra or {}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def verified(key: str) -> Optional[Path]:
    """The package of the entry for ``key`` once it passes its SHA-256 check; None when there is none. A
    damaged entry is deleted (and so rebuilt), never served."""
    path = cache_dir() / key / PACKAGE
    if not path.is_file():
        return None
    try:
        artifact.verified_manifest(path)
        return path
    except (ValueError, OSError):
        shutil.rmtree(path.parent, ignore_errors=True)
        return None


def loaded(path: Path) -> Optional[artifact.Artifact]:
    """The verified entry whose package is ``path``, loaded; None (and the entry deleted, so it is built anew)
    when this process cannot load it."""
    try:
        return artifact.load(path, verify=False)
    except (ValueError, RuntimeError, OSError):
        shutil.rmtree(path.parent, ignore_errors=True)
        return None


def lookup(key: str) -> Optional[artifact.Artifact]:
    """The entry for ``key``, verified and loaded; None when there is none (or it fails verification)."""
    path = verified(key)
    return None if path is None else loaded(path)


def store(key: str, build: Callable[[Path], Path]) -> Path:
    """Build an entry with ``build(package_path)`` (see :func:`mergepass.artifact.write`) in a scratch
    directory and move it into place; returns its package's path."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    scratch = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
    try:
        build(scratch / PACKAGE)
        try:
            os.replace(scratch, final)
        except OSError:  # another process stored the same key first: use that one
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final / PACKAGE


def entries() -> list[Path]:
    root = cache_dir()
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def clear() -> int:
    """Delete every entry; returns how many there were."""
    found = entries()
    shutil.rmtree(cache_dir(), ignore_errors=True)
    return len(found)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergepass.cache", description="Where mergepass's compile cache "
                                "lives, what it holds, and how to empty it.")
    p.add_argument("--clear", action="store_true", help="delete every entry")
    args = p.parse_args(argv)
    if args.clear:
        print(f"removed {clear()} entries from {cache_dir()} and {decide.forget()} kernel decisions from "
              f"{decide.decisions_dir()}")
        return 0
    found = entries()
    size = sum(f.stat().st_size for e in found for f in e.iterdir())
    print(f"{cache_dir()}: {len(found)} entries, {size / 2**20:.1f} MiB"
          + ("" if enabled() else " (turned off by MERGEPASS_CACHE)"))
    decisions = decide.kept()
    print(f"{decide.decisions_dir()}: {len(decisions)} kernel decisions, measured on this machine")
    for d in decisions:
        print(f"  {d.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
