"""Merge-map visualisation and the exported AOTInductor package."""
import shutil
import subprocess
import sys

import pytest
import torch

import mergepass
from mergepass.eval import merge_maps as viz
from conftest import tiny_vit


def _image(path, size=80):
    from PIL import Image
    Image.fromarray((torch.rand(size, size + 16, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


def test_viz_writes_png_of_expected_size(tmp_path):
    from PIL import Image
    m = tiny_vit(img_size=64)
    out = viz.render(str(_image(tmp_path / "in.jpg")), m, "tome", str(tmp_path / "m.png"), img_size=64, r=3)
    with Image.open(out) as im:
        assert im.size == (704, 374)  # two panels (input + final map) at 3.2 x 3.4 in, 110 dpi
    out = viz.render(str(tmp_path / "in.jpg"), m, "tome", str(tmp_path / "b.png"), img_size=64, per_block=True, r=3)
    with Image.open(out) as im:
        assert im.size == (1408, 374)  # input + one map per merging block


def test_source_maps_follow_the_schedule():
    m = tiny_vit(img_size=96)
    x = torch.randn(1, 3, 96, 96)
    sched, maps = viz.source_maps(m, x, "dfe_lgtm", skip=1, r=8, window=3)
    merging = [b for b in sched.blocks if b.merged]
    assert len(maps) == len(merging)
    for b, src in zip(merging, maps):
        assert src.shape == (1, 37) and len(torch.unique(src)) == b.tokens_out
        assert src[0, 0] == 0  # the class token stays put


def _tensor(out):
    """A package's output: its one tensor (AOTInductor returns a list)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def _eager(m, x, recipe="tome", **kw):
    with torch.no_grad():
        return torch.compile(m, backend=mergepass.backend(recipe, lower="eager", **kw), dynamic=False)(x)


@pytest.mark.xdist_group("tome_package")
def test_export_serves_every_batch_size_without_mergepass(tmp_path, tome_package):
    """Exported at batch 2, the package gives the right rows at batch 1 and 4 through torch's own loader."""
    m, path, _ = tome_package
    x = torch.randn(4, 3, 64, 64)
    for b in (1, 4):
        torch.save(x[:b], tmp_path / f"x{b}.pt")
        torch.save(_eager(m, x[:b], r=3), tmp_path / f"ref{b}.pt")
        torch._dynamo.reset()
    code = (
        "import sys, torch\n"
        f"f = torch._inductor.aoti_load_package({str(path)!r})\n"
        "for b in (1, 4):\n"
        f"    x = torch.load({str(tmp_path)!r} + f'/x{{b}}.pt'); ref = torch.load({str(tmp_path)!r} + f'/ref{{b}}.pt')\n"
        "    out = f(x); out = out[0] if isinstance(out, (list, tuple)) else out\n"
        "    assert out.shape == ref.shape, (out.shape, ref.shape)\n"
        "    print(float((out - ref).abs().max() / ref.abs().max()))\n"
        "assert 'mergepass' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    errs = [float(v) for v in res.stdout.split()]
    assert len(errs) == 2 and max(errs) <= 1e-5, errs


@pytest.mark.xdist_group("tome_package")
def test_load_verifies_the_package_and_refuses_inputs_it_cannot_serve(tmp_path, tome_package):
    _, path, _ = tome_package
    x = torch.randn(3, 3, 64, 64)
    f = mergepass.load(path)
    out = _tensor(f(x))
    assert out.shape == (3, 1000)
    with pytest.raises(ValueError, match=r"input 0 must be float32 of shape \(any, 3, 64, 64\).*\(2, 3, 80, 80\)"):
        f(torch.randn(2, 3, 80, 80))
    with pytest.raises(ValueError, match="must be float32"):
        f(x.double())
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4096])
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(data))
    (tmp_path / "bad.pt2.json").write_text(mergepass.artifact.manifest_path(path).read_text())
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        mergepass.load(bad)
    (tmp_path / "bad.pt2.json").unlink()
    with pytest.raises(ValueError, match="no manifest"):
        mergepass.load(bad)


@pytest.mark.xdist_group("tome_package")
def test_a_second_export_of_the_same_graph_comes_from_the_compile_cache(tmp_path, tome_package, monkeypatch):
    m, path, cache_dir = tome_package
    monkeypatch.delenv("MERGEPASS_CACHE", raising=False)
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(shutil.copytree(cache_dir, tmp_path / "cache")))
    first = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "first.pt2", r=3)

    def build(*a, **k):
        raise RuntimeError("the package was built again")
    monkeypatch.setattr(mergepass.artifact, "write", build)
    again = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "again.pt2", r=3)
    assert again.read_bytes() == first.read_bytes() and mergepass.load(again).meta["recipe"] == "tome"
    with pytest.raises(RuntimeError, match="built again"):  # another recipe is another package
        mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "other.pt2", r=2)
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(tmp_path / "not_a_dir" / "cache"))
    with pytest.warns(mergepass.MergepassWarning, match="compile cache .* is not usable"), \
            pytest.raises(RuntimeError, match="built again"):  # an unusable cache: built without it
        mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "third.pt2", r=3)


@pytest.mark.xdist_group("tome_package")
def test_a_loaded_package_runs_on_constants_in_aligned_memory(tome_package):
    """AOTInductor leaves a CPU package's constants at 16 mod 64 bytes, which slows AMX int8 GEMMs; mergepass's
    loader moves them to 64-byte-aligned memory, with the same outputs (that the package reads that memory is
    checked on a frozen int8 package below)."""
    from mergepass import compat
    _, path, _ = tome_package
    x = torch.randn(2, 3, 64, 64)
    plain = torch._inductor.aoti_load_package(str(path))
    run = mergepass.load(path).run
    constants = run._mergepass_aligned_constants
    dense = [t for t in constants.values() if t.layout == torch.strided and t.numel()]
    assert dense and all(t.data_ptr() % compat.ALIGNMENT == 0 for t in dense)
    with torch.no_grad():
        want = _tensor(plain(x))
        assert torch.equal(_tensor(run(x)), want)
    assert not compat.align_cpu_constants(plain, str(path.parent / "missing.pt2"))  # a failed step keeps it as loaded
    with torch.no_grad():
        assert torch.equal(_tensor(plain(x)), want)


def test_exported_int8_package_computes_what_the_backend_runs(tmp_path):
    """Same recipe and calibration: the package and the backend run the same quantized graph (bf16 rest included;
    packages keep torch's SDPA, which the backend is asked to keep too)."""
    m = tiny_vit(depth=1)
    x, calib = torch.randn(2, 3, 64, 64), [torch.randn(4, 3, 64, 64)]
    path = mergepass.export(m, x, "tome_int8", path=tmp_path / "q.pt2", calibration=calib, r=3)
    with torch.no_grad():
        be = mergepass.backend("tome_int8", r=3, calibration=calib, attention_kernel="sdpa")
        ref = torch.compile(m, backend=be, dynamic=False)(x)
        loaded = mergepass.load(path)
        out = _tensor(loaded(x))
    run = loaded.run
    assert torch.nn.functional.cosine_similarity(out.float(), ref).min() > 0.9999
    # the package reads the aligned copies of its frozen constants that mergepass.load gave it: a change shows
    dense = sorted((t for t in run._mergepass_aligned_constants.values()
                    if t.layout == torch.strided and t.is_floating_point() and t.numel() > 1), key=lambda t: -t.numel())
    with torch.no_grad():
        for t in dense:
            saved = t.clone()
            t.zero_()
            changed = _tensor(run(x))
            t.copy_(saved)
            if not torch.allclose(changed, out):
                break
        else:
            pytest.fail("no change to the aligned constants reached the package's output")
