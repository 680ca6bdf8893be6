"""The compile cache: int8 graphs compiled once, as verified AOTInductor packages, reused by later processes.

Inductor's own caches skip int8 graphs (their frozen weights are oneDNN tensors, which it cannot hash),
so each process would calibrate and compile again. An entry is keyed by everything its result depends
on: the merged graph's code and input shapes, the values of its weights, the resolved recipe, a digest
of the calibration data, the torch, torchao and mergepass versions (with a digest of mergepass's
sources) and the CPU. An entry is a directory written whole or not at all; its package is checked
against its SHA-256 before it is loaded, and one that fails is never loaded, whether or not it can be
deleted. A link in place of an entry is never followed.

It lives in ``$MERGEPASS_CACHE_DIR``, by default ``mergepass/`` in inductor's cache directory (so
clearing inductor's cache clears it too), and holds at most ``$MERGEPASS_CACHE_MAX_BYTES`` (default 2 GiB;
the least recently used entries go first). A folder another user owns, or others may write without the
sticky bit, is not used: whoever can write the cache can write an entry and its SHA-256 alike, and an
entry's package is code that runs. ``MERGEPASS_CACHE=0`` or ``mergepass.backend(..., cache=False)`` turns
it off; ``python -m mergepass.cache --clear`` empties it.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import fx

from . import artifact, compat
from . import decide
from .errors import Say, briefly

PACKAGE = "model.pt2"
DEFAULT_MAX_BYTES = 2 * 2**30
SCRATCH_MAX_AGE_S = 24 * 3600  # a scratch folder older than this is a build that ended without finishing
_KEY = re.compile(r"[0-9a-f]{64}")
_SCRATCH = re.compile(r"\.[0-9a-f]{16}-")  # a build under way, or one that never finished
_OWNER = re.compile(r"\.[0-9a-f]{16}-(\d+)-([0-9a-f]{8})-")  # ... named with its process and machine
_warn_once = Say()


def enabled() -> bool:
    return os.environ.get("MERGEPASS_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def serves(example_inputs: Sequence, on: Optional[bool] = None) -> bool:
    """Whether a compile of these inputs goes through the cache: ``on`` (None: :func:`enabled`), on the CPU,
    with a cache folder that is :func:`usable`."""
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    return (on if on is not None else enabled()) and on_cpu and usable()


def cache_dir() -> Path:
    env = os.environ.get("MERGEPASS_CACHE_DIR")
    if env:
        return Path(env)
    return Path(compat.inductor_cache_dir()) / "mergepass"


def max_bytes() -> int:
    """``$MERGEPASS_CACHE_MAX_BYTES``: bytes, or with a K, M, G or T suffix (powers of 1024); default 2 GiB."""
    raw = os.environ.get("MERGEPASS_CACHE_MAX_BYTES", "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", raw, re.IGNORECASE)
    if m is None:
        raise ValueError(f"MERGEPASS_CACHE_MAX_BYTES must be a size such as 2147483648 or 2G, got {raw!r}")
    return int(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " ")


def unsafe(root: Path) -> Optional[str]:
    """Why the cache folder ``root`` must not be used (None: it may): another user owns it, or others may write
    it without the sticky bit, and so replace an entry with code of theirs (its SHA-256 included)."""
    st = root.stat()  # a linked folder: its target is what gets written
    if not hasattr(os, "geteuid"):  # not POSIX: no owner or mode to check
        return None
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"it is owned by user id {st.st_uid}, not by this user ({uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"others may write to it (mode {stat.S_IMODE(st.st_mode):o}, without the sticky bit)"
    return None


def usable() -> bool:
    """Whether the cache folder can be used: created (mode 700) where missing, a folder, safe (see
    :func:`unsafe`), with a readable :func:`max_bytes`; says once why not."""
    root = cache_dir()
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = unsafe(root) if root.is_dir() else "it is not a folder"
        max_bytes()
    except (OSError, ValueError) as e:
        why = briefly(e)
    if why:
        _warn_once(f"mergepass: the compile cache at {root} is not usable ({why}); compiling without it")
    return why is None


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
              extra: Optional[dict] = None, inputs: Any = None) -> Optional[str]:
    """The key of a graph's compiled result: its code, inputs (shapes; values of module state), the
    constants it holds, the recipe, the calibration data, inductor's settings, versions and CPU.
    None when no key can capture what the result depends on (a custom inductor pass is set).
    ``inputs``: the :class:`~mergepass.graph.lift.Inputs` of ``example_inputs``, where already sorted."""
    settings = _inductor_settings()
    if settings is None:
        return None
    if inputs is None:
        from .graph.lift import Inputs
        inputs = Inputs(gm, example_inputs)
    state = [example_inputs[i] for i in sorted(inputs.const)]
    attrs = [v for v in (_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")
             if isinstance(v, torch.Tensor)]
    parts = {"code": gm.code, "inputs": [_describe(v) for v in example_inputs], "state": tensors_digest(state + attrs),
             "recipe": recipe, "calibration": None if calibration is None else tensors_digest(calibration),
             "inductor": settings, "grad": torch.is_grad_enabled(), "versions": _versions(), "extra": extra or {}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _linked(entry: Path) -> bool:
    """Whether a link stands in the place of an entry's folder, package or manifest: a link may lead anywhere,
    so it is never followed (nor what it leads to deleted)."""
    package = entry / PACKAGE
    return any(p.is_symlink() for p in (entry, package, artifact.manifest_path(package)))


def _remove(path: Path) -> Optional[OSError]:
    """Delete an entry or scratch folder (a link: the link only); the error where it could not be deleted."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass  # another process deleted it first
    except OSError as e:
        return e
    return None


def _discard(entry: Path, why: str) -> None:
    """Delete an entry that cannot be served, so that it is built anew; one that cannot be deleted (another
    user's, in a shared cache) stays unused."""
    error = _remove(entry)
    if error is not None:
        _warn_once(f"mergepass: the compile cache entry {entry} {why} and could not be deleted ({briefly(error)}); "
                   "it is never used, and its graph is compiled anew")


def _touch(entry: Path) -> None:
    """Mark an entry used now: eviction goes by the folder's modification time, least recent first."""
    try:
        os.utime(entry)
    except OSError:
        pass  # another user's entry: its age stays as it was


def verified(key: str) -> Optional[Path]:
    """The package of the entry for ``key`` once it passes its SHA-256 check; None when there is none. A
    damaged entry is deleted (and so rebuilt), never served."""
    entry = cache_dir() / key
    if not os.path.lexists(entry) or _linked(entry):
        return None
    path = entry / PACKAGE
    try:  # entries are moved into place whole: one without its package or manifest is damaged too
        artifact.verified_manifest(path)
    except (ValueError, OSError) as e:
        _discard(entry, f"fails its check ({briefly(e)})")
        return None
    _touch(entry)
    return path


def loaded(path: Path) -> Optional[artifact.Artifact]:
    """The verified entry whose package is ``path``, loaded; None (and the entry deleted, so it is built anew)
    when this process cannot load it."""
    try:
        return artifact.load(path, verify=False)
    except (ValueError, RuntimeError, OSError) as e:
        _discard(path.parent, f"does not load here ({briefly(e)})")
        return None


def lookup(key: str) -> Optional[artifact.Artifact]:
    """The entry for ``key``, verified and loaded; None when there is none (or it fails verification)."""
    path = verified(key)
    return None if path is None else loaded(path)


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _stale(scratch: Path) -> bool:
    """Whether a scratch folder belongs to a build that ended without moving it into place: its process (named
    in the folder's name) is gone from this machine, or it is older than :data:`SCRATCH_MAX_AGE_S` (a pid may be
    reused, and another machine's process cannot be asked)."""
    try:
        if time.time() - scratch.lstat().st_mtime > SCRATCH_MAX_AGE_S:
            return True
    except OSError:
        return False
    m = _OWNER.match(scratch.name)
    return m is not None and m[2] == _host() and not _alive(int(m[1]))


def clean_scratch() -> list[Path]:
    """Delete the scratch folders of builds that were killed (see :func:`_stale`); returns those deleted."""
    root = cache_dir()
    stale = [p for p in root.iterdir() if _SCRATCH.match(p.name) and _stale(p)] if root.is_dir() else []
    return [p for p in stale if _remove(p) is None]


def store(key: str, build: Callable[[Path], Path]) -> Path:
    """Build an entry with ``build(package_path)`` (see :func:`mergepass.artifact.write`) in a scratch
    directory and move it into place; returns the package to load: this build's, or a sound entry another
    process stored first, never one that failed verification. Where a damaged entry or a link that cannot be
    deleted holds the place, this build is served from its scratch folder, deleted once this process has
    ended. Deletes killed builds' scratch folders and, past :func:`max_bytes`, the least recently used entries."""
    root = cache_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    clean_scratch()
    final = root / key
    scratch = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-{os.getpid()}-{_host()}-", dir=root))
    keep = False
    try:
        build(scratch / PACKAGE)
        try:
            os.replace(scratch, final)
        except OSError:  # another process stored the same key first, or an entry that cannot be deleted is there
            existing = verified(key)
            keep = existing is None
            return scratch / PACKAGE if keep else existing
        _touch(final)
        evict(keep=key)
        return final / PACKAGE
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def _size(entry: Path) -> int:
    try:
        return sum(f.lstat().st_size for f in entry.iterdir())
    except OSError:
        return 0


def evict(keep: Optional[str] = None) -> list[Path]:
    """Delete the least recently used entries (but ``keep``) until the cache holds at most :func:`max_bytes`;
    returns those deleted."""
    limit = max_bytes()
    aged = []
    for e in entries():
        try:
            aged.append((e.lstat().st_mtime, e, _size(e)))
        except OSError:
            continue  # deleted meanwhile
    total = sum(size for _, _, size in aged)
    gone = []
    for _, e, size in sorted(aged, key=lambda t: t[0]):
        if total <= limit:
            break
        if e.name != keep and _remove(e) is None:
            total -= size
            gone.append(e)
    return gone


def entries() -> list[Path]:
    """The entries' folders (links in their place excluded: they are never served)."""
    root = cache_dir()
    return sorted(p for p in root.iterdir() if _KEY.fullmatch(p.name) and p.is_dir() and not p.is_symlink()) \
        if root.is_dir() else []


def clear() -> tuple[int, list[str]]:
    """Delete every entry and scratch folder (a link in an entry's place: the link, not what it leads to). The
    folder stays, and anything else in it. Returns how many entries were deleted and what could not be."""
    root = cache_dir()
    if not root.is_dir():
        return 0, []
    removed, failed = 0, []
    for p in sorted(root.iterdir()):
        if not (_KEY.fullmatch(p.name) or _SCRATCH.match(p.name)):
            continue
        error = _remove(p)
        if error is not None:
            failed.append(f"{p}: {briefly(error)}")
        elif not p.name.startswith("."):
            removed += 1
    return removed, failed


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergepass.cache", description="Where mergepass's compile cache "
                                "lives, what it holds, and how to empty it.")
    p.add_argument("--clear", action="store_true", help="delete every entry")
    args = p.parse_args(argv)
    if args.clear:
        removed, failed = clear()
        print(f"removed {removed} entries from {cache_dir()} and {decide.forget()} kernel decisions from "
              f"{decide.decisions_dir()}")
        for f in failed:
            print(f"could not delete {f}", file=sys.stderr)
        return 1 if failed else 0
    try:
        limit = f"{max_bytes() / 2**20:.0f} MiB"
    except ValueError as e:
        print(f"mergepass.cache: {e}", file=sys.stderr)
        return 2
    found = entries()
    size = sum(_size(e) for e in found)
    root = cache_dir()
    why = unsafe(root) if root.is_dir() else None
    print(f"{root}: {len(found)} entries, {size / 2**20:.1f} MiB of at most {limit} (MERGEPASS_CACHE_MAX_BYTES)"
          + ("" if enabled() else " (turned off by MERGEPASS_CACHE)") + (f" (not used: {why})" if why else ""))
    decisions = decide.kept()
    print(f"{decide.decisions_dir()}: {len(decisions)} kernel decisions, measured on this machine")
    for d in decisions:
        print(f"  {d.line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
