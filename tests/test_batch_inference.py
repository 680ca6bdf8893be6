"""Batch inference (python -m mergepass.infer): one compile on the driver, the package run in this process
or in a Ray Data actor pool, the outputs written as Parquet with the file names."""
import pytest
import torch

from conftest import tiny_vit
from mergepass.eval import batch_inference as bi

pytestmark = pytest.mark.xdist_group("batch_inference")


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
    package = bi.build_package(m, "tome", tmp_path / "m.pt2", img_size=64, outputs="features", r=3)
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
