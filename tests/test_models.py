"""'Any traced ViT': timm variants, torchvision, Hugging Face, real weights, and declines."""

import pytest
import torch

import mergepass
from helpers import DINO_CKPT, IMAGES, rel_err, tiny_vit
from reference import reference_forward

TIMM = {
    "deit3_layerscale": dict(name="deit3_small_patch16_224", embed_dim=96, num_heads=2),
    "dinov2_patch14": dict(name="vit_small_patch14_dinov2", img_size=56, embed_dim=96, num_heads=2),
    "registers4": dict(name="vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=96, num_heads=2),
    "qk_norm": dict(name="vit_tiny_patch16_224", qk_norm=True),
    "patch8_res40": dict(name="vit_tiny_patch16_224", patch_size=8, img_size=40),
    "no_cls_gap": dict(name="vit_tiny_patch16_224", class_token=False, global_pool="avg"),
}


def _check(model, x, recipe="tome", **merge):
    be = mergepass.backend(recipe, lower="eager", merge=merge)
    with torch.no_grad():
        out = torch.compile(model, backend=be, dynamic=False, fullgraph=True)(x)
        ref = reference_forward(model, x, be.schedule)
    logits = getattr(out, "logits", out)
    assert be.schedule.merging
    assert rel_err(logits, ref) <= 1e-4
    return be


@pytest.mark.parametrize("case", list(TIMM))
def test_timm_variants(case):
    kw = dict(TIMM[case])
    img = kw.pop("img_size", 64)
    m = tiny_vit(img_size=img, **kw)
    be = _check(m, torch.randn(2, 3, img, img), "tome", r=2)
    if case == "registers4":
        assert be.schedule.prefix == 5  # class token + 4 registers are protected


def test_timm_lgtm_on_layerscale_registers():
    m = tiny_vit("vit_small_patch14_reg4_dinov2", img_size=84, embed_dim=96, num_heads=2)
    be = _check(m, torch.randn(2, 3, 84, 84), "dfe_lgtm", skip=1, r=4, window=3)
    assert [b.kind for b in be.schedule.blocks][:2] == ["dense", "local"]


def test_torchvision_vit():
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=4,
                                             hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    torch.nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head
    be = _check(m, torch.randn(2, 3, 64, 64), "tome", r=3)
    assert be.schedule.prefix == 1 and len(be.schedule.blocks) == 3


def test_huggingface_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=128, image_size=64, patch_size=16, num_labels=10)
    torch.manual_seed(0)
    m = transformers.ViTForImageClassification(cfg).eval()
    be = _check(m, torch.randn(2, 3, 64, 64), "tome", r=3)
    assert len(be.schedule.blocks) == 3


def test_swin_is_declined_and_compiles_unchanged():
    import timm
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=32, depths=(1, 1),
                          num_heads=(1, 2), img_size=56, window_size=7).eval()
    x = torch.randn(1, 3, 56, 56)
    with pytest.warns(mergepass.MergepassWarning, match="no transformer blocks matched"):
        with torch.no_grad():
            out = torch.compile(m, backend=mergepass.backend("tome", lower="eager"), dynamic=False)(x)
    torch.testing.assert_close(out, m(x).detach())


@pytest.mark.skipif(not (DINO_CKPT.exists() and IMAGES.exists()), reason="shared weights/images not present")
def test_real_dinov2_weights_track_the_uncompressed_model():
    from mergepass.eval import data, models
    m = models.create("vit_small_patch14_dinov2", img_size=224, num_classes=0, checkpoint=str(DINO_CKPT))
    x, _, _ = data.load_images(IMAGES, limit=8)
    be = mergepass.backend("tome", merge={"r": 8}, lower="eager")
    with torch.no_grad():
        out = torch.compile(m, backend=be, dynamic=False)(x)
        ref = m(x)
    cos = torch.nn.functional.cosine_similarity(out, ref).mean().item()
    assert 0.98 < cos < 0.99999, cos


@pytest.mark.parametrize("recipe,over", [("tome", dict(r=4)), ("dfe_lgtm", dict(skip=1, r=4, window=3, transition=1))])
def test_protected_high_norm_tokens_match_the_reference(recipe, over):
    m = tiny_vit("vit_small_patch14_reg4_dinov2", img_size=84, embed_dim=96, num_heads=2)
    be = _check(m, torch.randn(2, 3, 84, 84), recipe, protect=2, **over)
    assert any(b.args.get("protect") == 2 for b in be.schedule.blocks)


@pytest.mark.parametrize("tower", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel"])
def test_huggingface_towers_at_r0_reproduce_the_model_on_an_amd_cpu_with_bf16(monkeypatch, tower):
    """attention_kernel = "auto" keeps FP32 attention in FP32 graphs, on the CPU where it once chose bf16."""
    transformers = pytest.importorskip("transformers")
    from mergepass import cpu
    from mergepass.kernels import attention
    flags = frozenset({"avx2", "avx512_vnni", "avx512_bf16"})
    monkeypatch.setattr(cpu, "_cpuinfo", lambda key: {"vendor_id": "AuthenticAMD", "flags": " ".join(flags)}.get(key, ""))
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(attention, "cpu_flags", lambda: flags)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                patch_size=16)
    cfg = {"ViTModel": transformers.ViTConfig, "CLIPVisionModel": transformers.CLIPVisionConfig,
           "SiglipVisionModel": transformers.SiglipVisionConfig}[tower](**size)
    torch.manual_seed(0)
    m = getattr(transformers, tower)(cfg).eval()
    x = torch.randn(2, 3, 64, 64)
    be = mergepass.backend("tome", merge={"r": 0, "kernel": "reference"}, lower="eager")
    with torch.no_grad():
        want = m(x).last_hidden_state
        out = torch.compile(m, backend=be, dynamic=False)(x).last_hidden_state
    assert all(r.attention_ops == 0 for r in be.results)
    assert rel_err(out, want) <= 1e-5
