"""Batch inference (python -m mergepass.infer): one compile on the driver, the package run in this process
or in a Ray Data actor pool, the outputs written as Parquet with the file names."""
import pytest
import torch

from helpers import run_cli, tiny_vit
from mergepass.eval import batch_inference as bi
from mergepass.eval import data


def _images(folder, n=6):
    from PIL import Image
    folder.mkdir()
    for i in range(n):
        Image.fromarray((torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return sorted(str(p) for p in folder.iterdir())


def test_ray_data_and_local_runs_give_the_same_rows_and_parquet(tmp_path):
    pytest.importorskip("ray.data")
    pq = pytest.importorskip("pyarrow.parquet")
    m = tiny_vit(depth=1, img_size=64)
    files = _images(tmp_path / "images")
    prep = {"size": 64, "resize": 73}
    package = bi.build_package(m, "tome", tmp_path / "m.pt2", img_size=64, outputs="features", merge={"r": 3})
    names, rows = bi.run_local(package, files, prep, batch_size=4, progress=False)
    assert names == [f for f in files if "broken" not in f] and len(rows) == 6 and rows[0].shape == (192,)
    x = torch.stack([bi.open_image(f, **prep) for f in names])
    with torch.no_grad():
        eager = m.forward_head(m.forward_features(x), pre_logits=True)
    cos = torch.nn.functional.cosine_similarity(torch.tensor(rows), eager)
    assert cos.min() > 0.9, cos  # merged (r=3), not identical, yet the same features

    import ray
    try:
        ray_names, ray_rows = bi.run_ray(package, files, prep, batch_size=2, workers=2)
    finally:
        ray.shutdown()
    assert ray_names == names
    torch.testing.assert_close(torch.tensor(ray_rows), torch.tensor(rows), rtol=1e-5, atol=1e-5)

    out = bi.write_parquet(names, rows, tmp_path / "out.parquet")
    table = pq.read_table(out)
    assert table.column("file").to_pylist() == names
    torch.testing.assert_close(torch.tensor(table.column("output").to_pylist()), torch.tensor(rows))


def test_features_need_a_timm_model():
    with pytest.raises(ValueError, match="--outputs features needs a timm model"):
        bi.Features(torch.nn.Linear(2, 2))


def _png(path, seed=0):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    Image.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()).save(path)
    return path


def _infer(capsys, monkeypatch, package, images, out, *flags):
    """``python -m mergepass.infer`` on a random tiny ViT at 64 px, served by ``package`` (no compile)."""
    monkeypatch.setattr(bi, "build_package", lambda *a, **k: package)
    return run_cli(capsys, "infer", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--recipe", "tome",
                   "--images", images, "--out", out, "--no-progress", *flags)


def _one_line_error(res, *needles):
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("compiled ")]  # progress
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert all(str(n) in lines[0] for n in needles), lines[0]


@pytest.mark.xdist_group("tome_package")
def test_infer_reads_every_image_under_the_folder_names_the_unreadable_and_keeps_an_existing_out(
        tmp_path, capsys, monkeypatch, tome_package):
    """Images beside subfolders and at any depth are all read; hidden folders are not; an unreadable image is
    named; an existing --out is replaced only with --overwrite."""
    pq = pytest.importorskip("pyarrow.parquet")
    images = tmp_path / "images"
    wanted = [_png(images / f"{i}.png", i) for i in range(5)] + [_png(images / "sub" / "5.png", 5),
                                                                 _png(images / "sub" / "deeper" / "6.png", 6)]
    _png(images / ".ipynb_checkpoints" / "0-checkpoint.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out.parquet"
    res = _infer(capsys, monkeypatch, tome_package[1], images, out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert pq.read_table(out).column("file").to_pylist() == [str(p) for p in sorted(wanted)]
    assert f"image {images / 'broken.png'} could not be read" in res.stderr
    _one_line_error(_infer(capsys, monkeypatch, tome_package[1], images, out), f"--out {out} exists", "--overwrite")
    (images / "6.png").write_bytes((images / "0.png").read_bytes())
    res = _infer(capsys, monkeypatch, tome_package[1], images, out, "--overwrite")
    assert res.returncode == 0 and pq.read_table(out).num_rows == len(wanted) + 1, res.stderr[-2000:]


@pytest.mark.xdist_group("tome_package")
def test_infer_check_inputs_stops_at_an_image_that_preprocesses_to_nan(tmp_path, capsys, monkeypatch, tome_package):
    pytest.importorskip("pyarrow")
    images = tmp_path / "images"
    _png(images / "a.png")
    config = data.data_config
    monkeypatch.setattr(data, "data_config", lambda *a, **k: {**config(*a, **k), "std": (0.0, 0.0, 0.0)})
    res = _infer(capsys, monkeypatch, tome_package[1], images, tmp_path / "unchecked.parquet")
    assert res.returncode == 0, res.stderr[-2000:]  # what --check-inputs is for: rows of NaN, written
    _one_line_error(_infer(capsys, monkeypatch, tome_package[1], images, tmp_path / "o.parquet", "--check-inputs"),
                    f"image {images / 'a.png'} holds NaN or inf values")
    assert not (tmp_path / "o.parquet").exists()


def test_a_folder_with_only_hidden_folders_names_it_and_the_extensions(tmp_path, capsys):
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _one_line_error(run_cli(capsys, "infer", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--images",
                            tmp_path, "--out", tmp_path / "o.parquet"),
                    f"no images in {tmp_path}: looked for .bmp, .jpeg, .jpg, .png, .webp files", "hidden")
    with pytest.raises(ValueError, match="looked for .bmp"):
        data.load_images(tmp_path)


def test_class_folders_keep_the_images_beside_them_and_ignore_hidden_ones(tmp_path):
    for path in ("a/0.png", "b/1.png", "b/more/2.png", "3.png", ".ipynb_checkpoints/4.png", ".5.png"):
        _png(tmp_path / path)
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in data.list_images(tmp_path)] == [
        ("3.png", -1), ("a/0.png", 0), ("b/1.png", 1), ("b/more/2.png", 1)]
