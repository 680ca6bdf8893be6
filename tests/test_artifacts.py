"""Merge-map visualisation and the exported AOTInductor package."""
import subprocess
import sys

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


def test_export_runs_without_mergepass(tmp_path):
    m = tiny_vit(depth=1)
    x = torch.randn(2, 3, 64, 64)
    path = mergepass.export(m, x, "tome", path=tmp_path / "m.pt2", r=3)
    with torch.no_grad():
        ref = torch.compile(m, backend=mergepass.backend("tome", r=3, lower="eager"), dynamic=False)(x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import sys, torch\n"
        f"f = torch._inductor.aoti_load_package({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "out = f(x); out = out[0] if isinstance(out, (list, tuple)) else out\n"
        "assert 'mergepass' not in sys.modules\n"
        "print(float((out - ref).abs().max() / ref.abs().max()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) <= 1e-5
