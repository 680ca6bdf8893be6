"""The command-line entry points: plan, demo (smoke), errors. ``python -m`` runs the plan and the demo
once each; the other cases call the same ``main`` in-process (no interpreter start per case)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mergepass
from helpers import run_cli, tiny_vit


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def _plan(capsys, *args):
    return run_cli(capsys, "plan", *args)


def test_plan_prints_schedule_and_totals():
    res = _run("mergepass.plan", "--model", "vit_tiny_patch16_224", "--recipe", "dfe_lgtm", "--batch", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "window=7" in out and "local 2x2 win" in out and "predicted speedup" in out
    assert out.count("blocks.") >= 12


def test_plan_covers_rope_and_names_why_a_model_is_declined(capsys):
    res = _plan(capsys, "--model", "eva02_tiny_patch14_224", "--img-size", "112", "--r", "8", "--batch", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "65 tokens (1 protected, grid 8x8)" in res.stdout and "global" in res.stdout
    res = _plan(capsys, "--model", "swin_tiny_patch4_window7_224", "--batch", "1")
    assert res.returncode == 2 and "2-D token map" in res.stderr and "compile it unchanged" in res.stderr


def test_plan_unknown_model_suggests_names(capsys):
    res = _plan(capsys, "--model", "vit_bse_patch16_224")
    assert res.returncode == 2 and "close matches: vit_base_patch16_224" in res.stderr


def test_plan_impossible_target(capsys):
    res = _plan(capsys, "--model", "vit_tiny_patch16_224", "--target-speedup", "40", "--batch", "1")
    assert res.returncode == 2 and "impossible schedule" in res.stderr


@pytest.mark.compile_cache  # the demo as the Quickstart runs it
def test_demo_smoke(tmp_path):
    res = _run("mergepass.demo", "--model", "vit_tiny_patch16_224", "--depth", "2", "--img-size", "64",
               "--batch", "4", "--eval-images", "8", "--rounds", "1", "--images", str(_images(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recipe soft_delayed_protect_int8" in res.stdout and "quantize=int8-static" in res.stdout  # the headline
    assert "speedup over eager FP32" in res.stdout and "CLS cosine mean" in res.stdout
    assert "blocks.1" in res.stdout
    assert "calibration on 4 inputs, fidelity on 4 held-out others" in res.stdout
    assert "fidelity vs uncompressed FP32 on 4 inputs" in res.stdout


@pytest.mark.parametrize("n, batch, evals, calib, held", [
    (128, 8, 64, 64, 64),   # the default: 64 calibrate, the 64 after them are evaluated
    (100, 8, 64, 32, 64),   # calibration gets the full batches left before the evaluated ones
    (8, 4, 8, 4, 4),        # too few for both: one batch each
    (12, 4, 5, 8, 4),       # evaluated: whole batches
    (7, 4, 8, 4, 0),        # one batch only: nothing to hold out, said so
])
def test_demo_calibrates_on_inputs_it_does_not_evaluate(n, batch, evals, calib, held):
    from mergepass.cli.demo import held_out
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    cal, ev, said = held_out(x, batch, evals)
    assert all(len(b) == batch for b in cal + ev)
    seen_cal = {int(v) for b in cal for v in b}
    seen_ev = {int(v) for b in ev for v in b}
    assert len(seen_cal) == calib
    if held:
        assert len(seen_ev) == held and not seen_cal & seen_ev and max(seen_cal) < min(seen_ev)
        assert f"calibration on {calib} inputs, fidelity on {held} held-out others" == said
    else:
        assert seen_ev == seen_cal and "same" in said and "too few" in said


def _images(tmp_path):
    import torch
    from PIL import Image
    for i in range(8):
        Image.fromarray((torch.rand(70, 80, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    return tmp_path


def _one_line_error(res, *needles):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for n in needles:
        assert str(n) in lines[0], lines[0]


TINY = ("--model", "vit_tiny_patch16_224", "--img-size", "64")


@pytest.mark.parametrize("command,args,said", [
    ("demo", ("--batch", "0"), "argument --batch: must be >= 1, got 0"),
    ("demo", ("--batch", "-3"), "argument --batch: must be >= 1, got -3"),
    ("plan", ("--model", "vit_tiny_patch16_224", "--batch", "100000"), "argument --batch: must be at most 4096"),
    ("plan", ("--model", "vit_tiny_patch16_224", "--calib-images", "-1"), "argument --calib-images: must be >= 1"),
    ("search", TINY + ("--images", ".", "--out", "o.toml", "--search-images", "0"),
     "argument --search-images: must be >= 1, got 0"),
    ("demo", ("--model", "vit_tiny_patch16_224", "--depth", "1", "--img-size", "8", "--batch", "1"),
     "--img-size 8 is smaller than one 16-pixel patch"),
    ("plan", ("--model", "vit_tiny_patch16_224", "--img-size", "8", "--batch", "1"),
     "--img-size 8 is smaller than one 16-pixel patch"),
    ("viz", TINY + ("--image", "x.png", "--recipe", "int8"), "nothing to draw: recipe 'int8' does not merge"),
    ("plan", ("--model", "vit_tiny_patch16_224", "--target-speedup", "nan"), "'search.target_speedup' must be a finite"),
])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(tmp_path, monkeypatch, capsys, command, args, said):
    monkeypatch.chdir(tmp_path)  # relative paths in the cases: nothing lands in the repository
    _one_line_error(run_cli(capsys, command, *args), said)


def test_demo_with_fewer_images_than_one_batch_says_so(tmp_path, capsys):
    from PIL import Image
    import torch
    for i in range(3):
        Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    res = run_cli(capsys, "demo", *TINY, "--depth", "1", "--batch", "4", "--images", tmp_path)
    _one_line_error(res, f"--images {tmp_path} has 3 readable images, fewer than one --batch of 4")


def test_viz_out_under_a_regular_file_exits_2_before_tracing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "merged.png"
    _one_line_error(run_cli(capsys, "viz", *TINY, "--image", tmp_path / "file", "--out", out),
                    f"--out {out}: {tmp_path / 'file'} is a file, not a folder")


def test_gpu_check_exits_cleanly_without_cuda():
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a CUDA GPU is present: run benchmarks/gpu_check.py itself")
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--rows", "fp16", "tome_int8_trt"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device; nothing run" in res.stdout and "Traceback" not in res.stderr


def test_the_gpu_recipe_ships_and_names_what_it_needs():
    import mergepass
    r = mergepass.load_recipe("tome_int8_trt")
    assert r.lower.target == "tensorrt" and r.quantize.engine == "modelopt" and r.merge.r == 16


# -- bad files and values: exit 2, naming them ----------------------------------------------------

def test_corrupt_checkpoint_exits_2_naming_the_file(tmp_path, capsys):
    for name in ("w.safetensors", "w.pth"):
        bad = tmp_path / name
        bad.write_bytes(b"not a checkpoint at all")
        res = run_cli(capsys, "plan", "--model", "vit_tiny_patch16_224", "--checkpoint", bad)
        assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_unreadable_image_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    res = run_cli(capsys, "viz", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--image", bad,
                  "--out", tmp_path / "o.png")
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_fractional_budget_above_one_is_rejected(capsys):
    res = run_cli(capsys, "plan", "--model", "vit_tiny_patch16_224", "--recipe", "tomato", "--budget", "1.5")
    assert res.returncode == 2 and "budget 1.5" in res.stderr


def test_mismatched_checkpoint_exits_2_naming_the_file_in_demo_and_search(tmp_path, capsys):
    shallow = tmp_path / "shallow.pth"  # wrong keys: one block fewer
    torch.save(tiny_vit(depth=1).state_dict(), shallow)
    head = tmp_path / "head.pth"  # wrong shape: 3 classes, not 1000
    torch.save(tiny_vit(depth=2, num_classes=3).state_dict(), head)
    demo = ("--model", "vit_tiny_patch16_224", "--depth", "2", "--img-size", "64", "--batch", "1",
            "--eval-images", "1")
    _one_line_error(run_cli(capsys, "demo", *demo, "--checkpoint", shallow), shallow, "missing keys (blocks.1.")
    _one_line_error(run_cli(capsys, "demo", *demo, "--checkpoint", head), head,
                    "head.weight is [3, 192] in the checkpoint, [1000, 192] in the model")
    _one_line_error(run_cli(capsys, "search", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--checkpoint",
                            shallow, "--images", tmp_path, "--out", tmp_path / "o.toml"), shallow, "missing keys")


def _bad_recipe(tmp_path, kind):
    if kind == "folder":
        (tmp_path / "folder.toml").mkdir()
        return tmp_path / "folder.toml"
    path = tmp_path / f"{kind}.toml"
    if kind == "latin1":
        path.write_bytes('description = "café"\nmethod = "tome"\n'.encode("latin-1"))
    else:
        path.write_text('[merge]\nmethod = "tome"\n[quantize.pt2e]\nkeep_fp32 = 5\n')
    return path


@pytest.mark.parametrize("kind,match", [("folder", "is a folder"), ("latin1", "is not UTF-8"),
                                        ("keep", "'quantize.pt2e.keep_fp32' must be a list of strings")])
def test_bad_recipe_file_exits_2_naming_it(tmp_path, capsys, kind, match):
    path = _bad_recipe(tmp_path, kind)
    with pytest.raises(ValueError, match=match):
        mergepass.load_recipe(str(path))
    res = run_cli(capsys, "demo", "--model", "vit_tiny_patch16_224", "--depth", "1", "--img-size", "32",
                  "--batch", "1", "--eval-images", "1", "--recipe", path)
    _one_line_error(res, path, match.strip("'"))


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit PNG that declares side x side pixels in a few dozen bytes (only the header is needed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_decompression_bomb_image_exits_2_in_viz_and_is_skipped_with_a_warning_in_a_folder(tmp_path, capsys,
                                                                                             monkeypatch):
    from PIL import Image
    from mergepass.eval import data
    bomb = _bomb_png(tmp_path / "bomb.png")
    _one_line_error(run_cli(capsys, "viz", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--image", bomb,
                            "--out", tmp_path / "o.png"), bomb, "too large to decode safely")
    Image.fromarray((torch.rand(70, 80, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "good.png")
    with pytest.warns(UserWarning, match="skipped image .*bomb.png is too large"):
        x, _, skipped = data.load_images(tmp_path, size=32)
    assert len(x) == 1 and skipped == 1
    # between PIL's limit and twice it PIL only warns, and would decode: refused all the same
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(ValueError, match="good.png is too large"):
        data.open_image(tmp_path / "good.png", 32)


@pytest.mark.parametrize("csv,match", [("name,class_index\n0.png,1\n", "has no 'file' column"),
                                       ("file,class_index\n0.png,1\n1.png,cat\n", "line 3: class_index 'cat'"),
                                       ("file,class_index\n0.png,-7\n", "line 2: class_index '-7'"),
                                       ("file,class_index\n0.png,1\n,2\n", "line 3: no file named"),
                                       ("class_index,file\n1\n", "line 2: no file named")])
def test_bad_labels_csv_exits_2_naming_it(tmp_path, capsys, csv, match):
    from PIL import Image
    for i in range(2):
        Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text(csv)
    res = run_cli(capsys, "plan", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1",
                  "--images", tmp_path)
    _one_line_error(res, tmp_path / "labels.csv", match)
