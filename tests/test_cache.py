"""The compile cache (mergepass.cache): int8 graphs served from disk to later compiles, never a stale or
foreign entry; and how often a dynamic-batch compile runs the backend."""
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mergepass
from helpers import tiny_vit
from reference import reference_forward
from mergepass import cache
from mergepass.rewrite.capture import capture_graphs, prepare

pytestmark = pytest.mark.compile_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A compile cache of the test's own, and kernel decisions of its own: ``--clear`` deletes both, and the
    shared decisions are read by other workers' compiles mid-test."""
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MERGEPASS_DECISIONS_DIR", str(tmp_path / "decisions"))
    return tmp_path / "cache"


@pytest.mark.xdist_group("tome_package")
def test_an_entry_is_written_on_a_miss_and_a_damaged_one_is_never_served(cache_dir, tome_package, capsys):
    _, first, written = tome_package  # exported with an empty cache: a miss
    shutil.copytree(written, cache_dir)  # this test damages and clears the entries: a copy of them
    [entry] = cache.entries()  # the miss wrote one entry, whose package was copied out
    package = entry / cache.PACKAGE
    assert package.read_bytes() == first.read_bytes()
    assert cache.main([]) == 0 and f"{cache_dir}: 1 entries" in capsys.readouterr().out

    damaged = shutil.copytree(entry, cache_dir / ("0" * 64)) / package.name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # a damaged entry fails its SHA-256 check: it is deleted, so its next compile misses (as the first did)
    assert cache.lookup(damaged.parent.name) is None and not damaged.parent.exists()
    assert cache.lookup(entry.name) is not None  # the sound entry is still served
    assert cache.main(["--clear"]) == 0 and "removed 1 entries" in capsys.readouterr().out and not cache.entries()


@pytest.fixture
def sound(cache_dir, tome_package):
    """A copy of the tome package's cache holding one sound entry: (its folder, a build that writes that
    package again, as a compile would)."""
    _, package, written = tome_package
    shutil.copytree(written, cache_dir)
    [entry] = cache.entries()
    return entry, lambda out: mergepass.artifact.copy(package, out)


def _damage(package):
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))


@pytest.mark.xdist_group("tome_package")
def test_a_damaged_entry_that_cannot_be_deleted_is_never_loaded(sound, monkeypatch):
    """In a shared cache another user's entry cannot be deleted: one that fails its check is not served, and the
    next build of its key is used from where it was built, not the damaged entry in its place."""
    entry, build = sound
    key = entry.name
    _damage(entry / cache.PACKAGE)
    real = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kw):  # as for a folder of another user's
        if Path(path) == entry:
            if not ignore_errors:
                raise PermissionError(13, "Permission denied", str(path))
            return None
        return real(path, ignore_errors=ignore_errors, **kw)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(mergepass.MergepassWarning, match="fails its check .* could not be deleted .*never used"):
        assert cache.lookup(key) is None
    package = cache.store(key, build)
    mergepass.artifact.verified_manifest(package)  # what a compile loads passes its check
    assert entry not in package.parents and entry.is_dir()
    assert mergepass.load(package).meta["recipe"] == "tome"


@pytest.mark.xdist_group("tome_package")
def test_a_link_in_place_of_an_entry_is_never_followed(sound, tmp_path):
    """A link may lead anywhere: the entry it stands for is a miss, what it leads to is neither served nor
    deleted, and a build of its key does not go through it."""
    entry, build = sound
    elsewhere = shutil.move(entry, tmp_path / "elsewhere")
    entry.symlink_to(elsewhere, target_is_directory=True)
    assert cache.verified(entry.name) is None and cache.lookup(entry.name) is None
    package = cache.store(entry.name, build)
    assert Path(elsewhere) not in package.resolve().parents and not package.is_symlink()
    mergepass.artifact.verified_manifest(package)
    assert entry.is_symlink() and (Path(elsewhere) / cache.PACKAGE).is_file()  # the target is untouched
    assert cache.entries() == [] and cache.main(["--clear"]) == 0 and not entry.exists() and Path(elsewhere).is_dir()


def test_a_cache_folder_others_can_write_or_another_user_owns_is_not_used(cache_dir, monkeypatch):
    """Whoever can write the cache can write an entry's package and its SHA-256 alike: such a folder is not used
    (said once); a shared folder with the sticky bit is."""
    x = [torch.zeros(1)]
    assert cache.serves(x) and cache_dir.stat().st_mode & 0o777 == 0o700  # created for this user only
    cache_dir.chmod(0o777)
    with pytest.warns(mergepass.MergepassWarning, match=r"compile cache at .* is not usable \(others may write"):
        assert not cache.serves(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cache.serves(x)  # said once
        cache_dir.chmod(0o1777)
        assert cache.serves(x)
        cache_dir.chmod(0o700)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)  # the folder's owner is then another user
    with pytest.warns(mergepass.MergepassWarning, match=f"not usable \\(it is owned by user id {uid}, not by this"):
        assert not cache.serves(x)
    monkeypatch.undo()
    monkeypatch.delenv("MERGEPASS_CACHE", raising=False)  # whatever the environment says, as the marker does
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MERGEPASS_CACHE_MAX_BYTES", "lots")
    with pytest.warns(mergepass.MergepassWarning, match="MERGEPASS_CACHE_MAX_BYTES must be a size"):
        assert not cache.serves(x)


@pytest.mark.xdist_group("tome_package")
def test_the_cache_keeps_to_its_size_deleting_the_least_recently_used_entries(sound, monkeypatch, capsys):
    entry, build = sound
    size = sum(f.stat().st_size for f in entry.iterdir())
    keys = [f"{i:x}" * 64 for i in range(1, 4)]  # three more entries, used oldest first
    for age, key in enumerate(keys):
        shutil.copytree(entry, cache.cache_dir() / key)
        os.utime(cache.cache_dir() / key, (1e9 + age, 1e9 + age))
    os.utime(entry, (1e9 - 1, 1e9 - 1))  # the least recently used of all
    assert cache.lookup(keys[0]) is not None  # used now: the most recent
    monkeypatch.setenv("MERGEPASS_CACHE_MAX_BYTES", str(3 * size))
    assert cache.main([]) == 0 and f"4 entries, {4 * size / 2**20:.1f} MiB of at most {3 * size / 2**20:.0f} MiB" \
        in capsys.readouterr().out
    new = "f" * 64
    cache.store(new, build)  # five entries where three fit: the two least recently used go
    assert [e.name for e in cache.entries()] == sorted([keys[0], keys[2], new])
    monkeypatch.setenv("MERGEPASS_CACHE_MAX_BYTES", "0")
    cache.store(keys[1], build)  # nothing fits: only the entry just stored stays
    assert [e.name for e in cache.entries()] == [keys[1]]
    monkeypatch.setenv("MERGEPASS_CACHE_MAX_BYTES", "2G")
    assert cache.max_bytes() == 2 * 2**30 == cache.DEFAULT_MAX_BYTES


@pytest.mark.xdist_group("tome_package")
def test_scratch_folders_of_killed_builds_are_deleted_by_the_next_store(sound):
    import subprocess
    entry, build = sound
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a build process that has ended
    host = cache._host()
    dead = cache.cache_dir() / f".{'a' * 16}-{gone.pid}-{host}-x1"
    old = cache.cache_dir() / f".{'b' * 16}-abcdefgh"  # named without its process; older than a day
    live = cache.cache_dir() / f".{'c' * 16}-{os.getpid()}-{host}-x2"  # a build under way
    other = cache.cache_dir() / ".not-a-scratch-folder"
    for d in (dead, old, live, other):
        d.mkdir()
        (d / cache.PACKAGE).write_bytes(b"partial")
    os.utime(old, (1e9, 1e9))
    os.utime(other, (1e9, 1e9))
    cache.store("d" * 64, build)
    assert not dead.exists() and not old.exists() and live.is_dir() and other.is_dir()


@pytest.mark.xdist_group("tome_package")
def test_clear_through_a_linked_folder_deletes_the_entries_and_says_so(sound, tmp_path, monkeypatch, capsys):
    entry, _ = sound
    link = tmp_path / "link"
    link.symlink_to(cache.cache_dir(), target_is_directory=True)
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(link))
    assert cache.main(["--clear"]) == 0 and f"removed 1 entries from {link}" in capsys.readouterr().out
    assert not entry.exists() and cache.entries() == [] and link.is_symlink()


def _key(m, x, recipe="int8", calib=None, **overrides):
    gm, ex = capture_graphs(m, x)[0]
    return cache.graph_key(prepare(gm, ex), ex, mergepass.load_recipe(recipe, **overrides).to_dict(), calib)


def test_the_key_changes_with_recipe_calibration_weights_and_inductor_settings():
    m = tiny_vit(depth=1)
    x, calib = torch.randn(2, 3, 64, 64), [(torch.randn(2, 3, 64, 64),)]
    base = _key(m, x, calib=calib)
    assert _key(m, x, calib=calib) == base  # the same inputs give the same key
    assert _key(m, x, calib=calib, quantize={"pt2e": {"observer": "histogram"}}) != base
    assert _key(m, x, calib=[(calib[0][0] + 1e-3,)]) != base
    assert _key(m, torch.randn(4, 3, 64, 64), calib=calib) != base
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight[0, 0] += 1e-4
    assert _key(m, x, calib=calib) != base
    from torch._inductor import config as inductor_config
    with inductor_config.patch(max_autotune=True):
        assert _key(m, x, calib=calib) not in (base, None)
    with inductor_config.patch(post_grad_custom_post_pass=lambda g: None):
        assert _key(m, x, calib=calib) is None  # a pass without a stable identity: no key, no cache


def test_cache_is_off_with_the_environment_variable(cache_dir, monkeypatch):
    monkeypatch.setenv("MERGEPASS_CACHE", "0")
    assert not cache.enabled()
    monkeypatch.setenv("MERGEPASS_CACHE", "1")
    assert cache.enabled() and cache.cache_dir() == cache_dir


def test_dynamic_batch_runs_the_backend_no_more_often_than_plain_inductor(monkeypatch):
    """dynamic=True: each graph is quantized and compiled once (or served from the cache), in no more backend
    calls than a backend on AOTAutograd, such as inductor (which restarts its first compile once for the
    model's float attributes)."""
    from torch._dynamo.backends.debugging import aot_eager  # AOTAutograd, as inductor, without its codegen
    m = tiny_vit(depth=1)
    sizes = (1, 3, 8)
    plain = []

    def counting(gm, ex):
        plain.append(1)
        return aot_eager(gm, ex)
    with torch.no_grad():
        c = torch.compile(m, backend=counting, dynamic=True)
        for b in sizes:
            c(torch.randn(b, 3, 64, 64))
    torch._dynamo.reset()
    pipeline = sys.modules["mergepass.pipeline"]  # where every entry point quantizes
    quantized = []
    real = pipeline.quantize
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: quantized.append(1) or real(*a, **k))
    be = mergepass.backend("tome_int8", merge={"r": 2}, calibration=[torch.randn(4, 3, 64, 64)])
    calls = []
    real_call = type(be).__call__
    monkeypatch.setattr(type(be), "__call__", lambda self, gm, ex: calls.append(1) or real_call(self, gm, ex))
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        c = torch.compile(m, backend=be, dynamic=True)
        outs = {b: c(x[:b]) for b in sizes}
    assert len(calls) <= len(plain), (len(calls), len(plain))
    # batch 1 (dynamo specialises it), then every other batch: each quantized here or in an earlier run
    assert len(quantized) + sum(r.cached for r in be.results) == len(be.results) == 2
    assert all(r.schedule is not None for r in be.results)
    for b in (3,):  # one compiled graph for batches 3 and 8: the same rows
        torch.testing.assert_close(outs[b], outs[8][:b], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # every batch size: close to the same merges in plain eager ops
        for b in sizes:
            ref = reference_forward(m, x[:b], be.schedule)
            assert torch.nn.functional.cosine_similarity(outs[b], ref).min().item() > 0.99, b
