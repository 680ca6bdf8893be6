"""The compile cache (mergepass.cache): int8 graphs served from disk to later compiles, never a stale or
foreign entry; and how often a dynamic-batch compile runs the backend."""
import shutil
import sys

import pytest
import torch

import mergepass
from conftest import tiny_vit
from reference import reference_forward
from mergepass import cache
from mergepass.graph.capture import capture_graphs, prepare


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MERGEPASS_CACHE", raising=False)
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


def _key(m, x, recipe="int8", calib=None, **overrides):
    gm, ex = capture_graphs(m, x)[0]
    return cache.graph_key(prepare(gm, ex), ex, mergepass.load_recipe(recipe, **overrides).to_dict(), calib)


def test_the_key_changes_with_recipe_calibration_weights_and_inductor_settings():
    m = tiny_vit(depth=1)
    x, calib = torch.randn(2, 3, 64, 64), [(torch.randn(2, 3, 64, 64),)]
    base = _key(m, x, calib=calib)
    assert _key(m, x, calib=calib) == base  # the same inputs give the same key
    assert _key(m, x, calib=calib, quantize_observer="histogram") != base
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
    be = mergepass.backend("tome_int8", r=2, calibration=[torch.randn(4, 3, 64, 64)])
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
