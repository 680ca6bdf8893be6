"""benchmarks/token_policies.py: its block-by-block forward against timm's and mergepass's, and its steps' invariants."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import token_policies as tp  # noqa: E402

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=70, depth=3,
                             num_classes=0).eval()


def _images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 70, 70)


def test_dense_policy_is_the_model(model):
    x = _images()
    with torch.no_grad():
        ours = tp.cls_features(model, x, tp.parse("dense:0*3", 3))
        ref = model.forward_features(x)[:, 0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_pruning_in_the_last_block_leaves_the_class_token_alone(model):
    x = _images()
    with torch.no_grad():
        a = tp.cls_features(model, x, tp.parse("tome:2*2,dense:0*1", 3))
        b = tp.cls_features(model, x, tp.parse("tome:2*2,prune:6*1", 3))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tome_policy_matches_the_tome_recipe(model):
    from mergepass.eval.evaluate import Features, compile_spec
    x = _images()
    torch._dynamo.reset()
    fn, _ = compile_spec(Features(model).eval(), "tome:merge.r=4,lower.target=eager", [x])
    with torch.no_grad():
        ref = fn(x)[:, 0]
        ours = tp.cls_features(model, x, tp.parse("tome:4*3", 3))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_protected_tokens_neither_leave_nor_absorb():
    torch.manual_seed(2)
    b, n, c, r = 2, 17, 8, 5
    x, keys = torch.randn(b, n, c), torch.randn(b, n, c)
    size = torch.ones(b, n, 1)
    protect = torch.zeros(b, n - 1, dtype=torch.bool)
    protect[:, [0, 3, 8]] = True
    out, s = tp.tome_protected(x, keys, size, r, protect)
    assert out.shape == (b, n - r, c) and torch.allclose(s.sum(1), size.sum(1))
    for i in range(b):  # each protected token is still there, alone and unchanged
        for j in (0, 3, 8):
            hit = (out[i] - x[i, 1 + j]).abs().amax(-1) < 1e-6
            assert hit.sum() == 1 and s[i, hit.nonzero()[0, 0], 0] == 1


def test_soft_protection_and_bias_keep_sizes_and_counts():
    torch.manual_seed(3)
    b, n, c, r = 2, 17, 8, 5
    x = torch.randn(b, n, c)
    size = torch.ones(b, n, 1)
    out, s = tp.soft_biased(x, size, r, torch.rand(b, n - 1))
    assert out.shape == (b, n - r, c) and torch.allclose(s.sum(1), size.sum(1))
    out, s = tp.soft_biased(x, size, r, torch.zeros(b, n - 1))
    ref, s_ref, _ = tp.soft_merge(x, x, size, None, r=r, prefix=1, k=1, compare="tokens")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(s, s_ref)


def test_parse_and_macs(model):
    steps = tp.parse("prune:2*1,soft+protect=3:2*2", 3)
    assert steps[0] == ("prune", 2, {}) and steps[2] == ("soft", 2, {"protect": "3"})
    with pytest.raises(ValueError, match="covers 2 blocks"):
        tp.parse("tome:2*2", 3)
    tokens = model.patch_embed.num_patches + 1
    assert tp.macs_ratio(model, tp.parse("dense:0*3", 3), tokens) == 1.0
    assert tp.macs_ratio(model, tp.parse("prune:2*3", 3), tokens) == tp.macs_ratio(model, tp.parse("tome:2*3", 3), tokens)
