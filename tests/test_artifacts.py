"""Merge-map visualisation and the exported AOTInductor package."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mergepass
from mergepass.eval import merge_maps as viz
from helpers import tiny_vit


def _image(path, size=80):
    from PIL import Image
    Image.fromarray((torch.rand(size, size + 16, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


def test_viz_writes_png_of_expected_size(tmp_path):
    from PIL import Image
    m = tiny_vit(img_size=64)
    out = viz.render(str(_image(tmp_path / "in.jpg")), m, "tome", str(tmp_path / "m.png"), img_size=64, merge={"r": 3})
    with Image.open(out) as im:
        assert im.size == (704, 374)  # two panels (input + final map) at 3.2 x 3.4 in, 110 dpi
    out = viz.render(str(tmp_path / "in.jpg"), m, "tome", str(tmp_path / "b.png"), img_size=64, per_block=True, merge={"r": 3})
    with Image.open(out) as im:
        assert im.size == (1408, 374)  # input + one map per merging block


def test_source_maps_follow_the_schedule():
    m = tiny_vit(img_size=96)
    x = torch.randn(1, 3, 96, 96)
    sched, maps = viz.source_maps(m, x, "dfe_lgtm", merge={"skip": 1, "r": 8, "window": 3})
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
    """Exported at batch 2, the package gives the right rows at batch 1 and 4 through torch's own loader, with
    the package's own input guard on (AOTI_RUNTIME_CHECK_INPUTS=1), which refuses an input of other strides."""
    m, path, _ = tome_package
    x = torch.randn(4, 3, 64, 64)
    for b in (1, 4):
        torch.save(x[:b], tmp_path / f"x{b}.pt")
        torch.save(_eager(m, x[:b], merge={"r": 3}), tmp_path / f"ref{b}.pt")
        torch._dynamo.reset()
    code = (
        "import sys, torch\n"
        f"f = torch._inductor.aoti_load_package({str(path)!r})\n"
        "for b in (1, 4):\n"
        f"    x = torch.load({str(tmp_path)!r} + f'/x{{b}}.pt'); ref = torch.load({str(tmp_path)!r} + f'/ref{{b}}.pt')\n"
        "    out = f(x); out = out[0] if isinstance(out, (list, tuple)) else out\n"
        "    assert out.shape == ref.shape, (out.shape, ref.shape)\n"
        "    print(float((out - ref).abs().max() / ref.abs().max()))\n"
        "try:\n"
        "    f(x.to(memory_format=torch.channels_last))\n"
        "except RuntimeError as e:\n"
        "    assert 'stride' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('an input of other strides was run')\n"
        "assert 'mergepass' not in sys.modules\n")
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    errs = [float(v) for v in res.stdout.split()]
    assert len(errs) == 2 and max(errs) <= 1e-5, errs


@pytest.mark.xdist_group("tome_package")
def test_load_lays_out_inputs_of_other_strides_as_the_package_was_compiled(tome_package):
    """The kernels index an input by the strides the package was compiled for: a slice of a larger image and a
    channels_last tensor give the rows of their contiguous copies, and a batch checks for NaN on request."""
    _, path, _ = tome_package
    f = mergepass.load(path)
    image = torch.randn(4, 3, 80, 96)
    sliced = image[:, :, 8:72, 16:80]
    channels_last = sliced.contiguous(memory_format=torch.channels_last)
    assert not sliced.is_contiguous() and not channels_last.is_contiguous()
    with torch.no_grad():
        want = _tensor(f(sliced.contiguous()))
        for x in (sliced, channels_last, sliced[1:3]):
            torch.testing.assert_close(_tensor(f(x)), want[:x.shape[0]] if x.shape[0] == 4 else want[1:3])
    checked = mergepass.load(path, check_inputs=True)
    bad = sliced.clone()
    bad[2, 1, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="input 0 holds NaN or inf"):
        checked(bad)
    _tensor(checked(sliced))  # a finite one runs


def _tampered(tmp_path, path, edit, name="t.pt2"):
    """A copy of the package at ``path`` whose manifest ``edit(manifest)`` changed (its SHA-256 still matches)."""
    import json
    copy = mergepass.artifact.copy(path, tmp_path / name)
    manifest = json.loads(mergepass.artifact.manifest_path(copy).read_text())
    edit(manifest)
    mergepass.artifact.manifest_path(copy).write_text(json.dumps(manifest))
    return copy


def _set(key, value, at=None):
    def edit(manifest):
        target = manifest["inputs"][0] if at == "input" else manifest
        if value is KeyError:
            del target[key]
        else:
            target[key] = value(target[key]) if callable(value) else value
    return edit


@pytest.mark.xdist_group("tome_package")
@pytest.mark.parametrize("edit,match", [
    (_set("shape", lambda s: s[:2] + [32, 32], "input"), r"input 0 is float32 of shape \(any, 3, 32, 32\).*compiled "
                                                          r"for float32 of shape \(any, 3, 64, 64\)"),
    (_set("shape", lambda s: s[:2] + [128, 128], "input"), r"shape \(any, 3, 128, 128\).*compiled for"),
    (_set("dtype", "float16", "input"), r"float16 of shape .*compiled for float32"),
    (_set("stride", lambda s: [s[0], 1, 192, 3], "input"), r"strides \(12288, 1, 192, 3\) on cpu, but the "
                                                            r"package was compiled for .*strides \(12288, 4096, 64, 1\)"),
    (_set("inputs", 5), r"'inputs' must be a list of input specs, got 5"),
    (_set("inputs", lambda i: i + i), r"lists 2 input\(s\), but the package was compiled for 1"),
    (_set("dtype", KeyError, "input"), r"inputs\[0\]: missing 'dtype'"),
    (_set("dtype", "float99", "input"), r"'dtype' must name a torch dtype, got \"float99\""),
    (_set("shape", [None, 3, -64, 64], "input"), r"'shape' and 'stride' must be lists"),
    (_set("sha256", 7), r"'sha256' must be a SHA-256 digest"),
    (_set("format", 1), r"format 1, where this mergepass reads format 2"),
], ids=["shape32", "shape128", "dtype", "stride", "inputs5", "two_inputs", "no_dtype", "bad_dtype", "bad_shape",
        "sha_type", "format"])
def test_load_refuses_a_manifest_the_package_contradicts(tmp_path, tome_package, edit, match):
    """A manifest is checked for its structure and against the record of its inputs the package carries: an
    edited shape would make the package read past or short of its input. One line names the problem."""
    _, path, _ = tome_package
    with pytest.raises(ValueError, match=match) as e:
        mergepass.load(_tampered(tmp_path, path, edit))
    assert "\n" not in str(e.value)


@pytest.mark.xdist_group("tome_package")
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_load_refuses_an_archive_member_that_leads_outside_its_folder(tmp_path, tome_package, where):
    """torch's loader extracts every member under the model's folder into a temporary folder, joining the names
    as they are: ``..`` would write outside it. Refused before anything is extracted."""
    import zipfile
    _, path, _ = tome_package
    escaped = tmp_path / "outside" / "escaped.txt"
    escaped.parent.mkdir()
    copy = mergepass.artifact.copy(path, tmp_path / "z.pt2")
    with zipfile.ZipFile(copy, "a") as z:
        folder = next(n for n in z.namelist() if n.endswith(".so")).rsplit("/", 1)[0]
        z.writestr(f"{folder}/{'../' * 40}{str(escaped).lstrip('/')}" if where == "relative" else str(escaped), "x")
    copy = _tampered(tmp_path, copy, lambda m: m.update(sha256=mergepass.artifact.file_digest(copy)), "z2.pt2")
    with pytest.raises(ValueError, match=r"archive member .*escaped\.txt' would be written outside the folder"):
        mergepass.load(copy)
    assert not escaped.exists()


def test_export_of_an_empty_batch_is_refused_in_one_line(tmp_path):
    m = tiny_vit(depth=1)
    with pytest.raises(ValueError, match=r"^mergepass.export: example_input has batch size 0 "
                                         r"\(shape \(0, 3, 64, 64\)\)"):
        mergepass.export(m, torch.randn(0, 3, 64, 64), "tome", path=tmp_path / "e.pt2", merge={"r": 3}, cache=False)
    assert not (tmp_path / "e.pt2").exists()


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
@pytest.mark.compile_cache
def test_a_second_export_of_the_same_graph_comes_from_the_compile_cache(tmp_path, tome_package, monkeypatch):
    m, path, cache_dir = tome_package
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(shutil.copytree(cache_dir, tmp_path / "cache")))
    first = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "first.pt2", merge={"r": 3})

    def build(*a, **k):
        raise RuntimeError("the package was built again")
    monkeypatch.setattr(mergepass.artifact, "write", build)
    again = mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "again.pt2", merge={"r": 3})
    assert again.read_bytes() == first.read_bytes() and mergepass.load(again).meta["recipe"] == "tome"
    with pytest.raises(RuntimeError, match="built again"):  # another recipe is another package
        mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "other.pt2", merge={"r": 2})
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("MERGEPASS_CACHE_DIR", str(tmp_path / "not_a_dir" / "cache"))
    with pytest.warns(mergepass.MergepassWarning, match="compile cache .* is not usable"), \
            pytest.raises(RuntimeError, match="built again"):  # an unusable cache: built without it
        mergepass.export(m, torch.randn(2, 3, 64, 64), "tome", path=tmp_path / "third.pt2", merge={"r": 3})


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
    path = mergepass.export(m, x, "tome_int8", path=tmp_path / "q.pt2", calibration=calib, merge={"r": 3})
    with torch.no_grad():
        be = mergepass.backend("tome_int8", merge={"r": 3}, lower={"attention_kernel": "sdpa"}, calibration=calib)
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
