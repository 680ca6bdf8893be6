"""The architectures mergepass is checked on: one row per model family, buildable at full size (the
coverage table in docs/models.md) or tiny (the tests), always with random weights and nothing
downloaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .models import input_size

TINY = dict(depth=3, embed_dim=64, num_heads=2, num_classes=0)
HF_TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, image_size=64,
               patch_size=16)


@dataclass(frozen=True)
class Case:
    """A model family: how to build it, and what mergepass does with it.

    ``expect``: "merged" or "declined"; ``construct``: what the row exercises or, for a decline, a
    phrase the warning names."""
    key: str
    family: str
    source: str                       # "timm" | "transformers" | "torchvision"
    name: str                         # timm name, transformers class, or torchvision builder
    expect: str
    construct: str
    tiny: dict = field(default_factory=dict)
    img: int = 64                     # tiny image size
    config: dict = field(default_factory=dict)  # transformers config fields at both sizes
    reason: str = ""                  # why a declined family is declined, for the table

    @property
    def hidden_states(self) -> bool:
        """Called with ``output_hidden_states=True`` (what vision-language models read)."""
        return self.source == "transformers"

    def build(self, tiny: bool = True) -> tuple[torch.nn.Module, torch.Tensor]:
        """An eval-mode model with random weights and a batch of 2 random images of its input size."""
        torch.manual_seed(0)
        model = _BUILDERS[self.source](self, tiny).eval()
        if tiny:
            perturb_constants(model)
        size = self.img if tiny else input_size(model)
        return model, torch.randn(2, 3, size, size)

    def run(self, model: torch.nn.Module, x: torch.Tensor):
        """The model's outputs as a flat list of tensors (hidden states included)."""
        if not self.hidden_states:
            return [model(x)]
        out = model(x, output_hidden_states=True)
        pooled = getattr(out, "pooler_output", None)
        return [out.last_hidden_state, *out.hidden_states] + ([pooled] if pooled is not None else [])


def perturb_constants(model: torch.nn.Module) -> None:
    """Give parameters that start constant (layer scales near 0, zero position-bias tables, unit
    norm weights) random values, so a tiny model exercises every term its layout has."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn_like(p) * 0.5)


def _timm(case: Case, tiny: bool) -> torch.nn.Module:
    import timm
    kw = {**TINY, "img_size": case.img, **case.tiny} if tiny else {}
    return timm.create_model(case.name, pretrained=False, **{k: v for k, v in kw.items() if v is not None})


def _transformers(case: Case, tiny: bool) -> torch.nn.Module:
    import transformers
    cls = getattr(transformers, case.name)
    cfg = cls.config_class(**({**HF_TINY, **case.tiny} if tiny else {}), **case.config)
    return cls(cfg)


def _torchvision(case: Case, tiny: bool) -> torch.nn.Module:
    import torchvision
    if tiny and case.name == "vit_b_16":
        m = torchvision.models.VisionTransformer(image_size=case.img, patch_size=16, num_layers=3, num_heads=2,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
        torch.nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head
        return m
    return torchvision.models.get_model(case.name, weights=None)


_BUILDERS: dict[str, Callable[[Case, bool], torch.nn.Module]] = {
    "timm": _timm, "transformers": _transformers, "torchvision": _torchvision}


CASES: list[Case] = [
    Case("vit", "ViT", "timm", "vit_base_patch16_224", "merged", "class token"),
    Case("deit_distilled", "DeiT (distilled)", "timm", "deit_base_distilled_patch16_224", "merged",
       "class + distillation tokens"),
    Case("deit3", "DeiT-III", "timm", "deit3_base_patch16_224", "merged", "LayerScale"),
    Case("dinov2", "DINOv2", "timm", "vit_small_patch14_dinov2", "merged", "patch 14, LayerScale", img=56),
    Case("dinov2_reg4", "DINOv2 with registers", "timm", "vit_small_patch14_reg4_dinov2", "merged",
       "4 register tokens (protected)", img=56),
    Case("clip", "CLIP", "timm", "vit_base_patch16_clip_224", "merged", "pre-norm"),
    Case("clip_quickgelu", "CLIP (QuickGELU)", "timm", "vit_base_patch32_clip_quickgelu_224", "merged",
       "QuickGELU, patch 32", img=128),
    Case("siglip", "SigLIP", "timm", "vit_base_patch16_siglip_224", "merged",
       "no class token, attention-pool (MAP) head"),
    Case("siglip_gap", "SigLIP (GAP)", "timm", "vit_base_patch16_siglip_gap_224", "merged",
       "no class token, average pool"),
    Case("eva02", "EVA-02", "timm", "eva02_base_patch14_224", "merged", "RoPE, SwiGLU, sub-LN", img=56),
    Case("vit_rope", "ViT RoPE (axial)", "timm", "vit_base_patch16_rope_224", "merged", "RoPE"),
    Case("vit_rope_mixed", "ViT RoPE (mixed)", "timm", "vit_base_patch16_rope_mixed_224", "merged",
       "learned per-block RoPE"),
    Case("vit_rope_reg1", "ViT RoPE + register", "timm", "vit_base_patch16_rope_reg1_gap_256", "merged",
       "RoPE, register token, average pool"),
    Case("cait", "CaiT", "timm", "cait_xxs24_224", "merged",
       "talking-heads attention; class-attention blocks left dense"),
    Case("beit", "BEiT", "timm", "beit_base_patch16_224", "merged", "relative position bias per block"),
    Case("vit_relpos", "ViT relative position", "timm", "vit_relpos_base_patch16_224", "merged",
       "relative position bias, no class token"),
    Case("flexivit", "FlexiViT", "timm", "flexivit_small", "merged", "class token"),
    Case("naflexvit", "NaFlexViT", "timm", "naflexvit_base_patch16_gap", "merged", "fixed-size images"),
    Case("samvit", "SAM image encoder", "timm", "samvit_base_patch16", "declined", "2-D token map",
       tiny=dict(window_size=2, global_attn_indexes=(1,)),
       reason="windowed and global blocks keep a 2-D token map [B, H, W, C] for the conv neck"),
    Case("swin", "Swin", "timm", "swin_tiny_patch4_window7_224", "declined", "2-D token map",
       tiny=dict(depth=None, embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=7), img=56,
       reason="hierarchical: shifted windows over a 2-D token map, patch merging between stages"),
    Case("hiera", "Hiera", "timm", "hiera_tiny_224", "declined", "hierarchical",
       tiny=dict(depth=None, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1)),
       reason="hierarchical: mask-unit attention and pooling between stages"),
    Case("hf_vit", "ViT", "transformers", "ViTModel", "merged", "class token"),
    Case("hf_deit", "DeiT", "transformers", "DeiTModel", "merged", "class + distillation tokens"),
    Case("hf_dinov2", "DINOv2", "transformers", "Dinov2Model", "merged", "LayerScale"),
    Case("hf_dinov2_reg", "DINOv2 with registers", "transformers", "Dinov2WithRegistersModel", "merged",
       "4 register tokens"),
    Case("hf_clip", "CLIP vision tower", "transformers", "CLIPVisionModel", "merged", "pre-LayerNorm, QuickGELU"),
    Case("hf_siglip", "SigLIP vision tower", "transformers", "SiglipVisionModel", "merged",
       "no class token, attention-pool head"),
    Case("hf_beit", "BEiT", "transformers", "BeitModel", "merged", "relative position bias",
       config=dict(use_relative_position_bias=True)),
    Case("tv_vit", "ViT", "torchvision", "vit_b_16", "merged", "nn.MultiheadAttention"),
    Case("tv_swin", "Swin", "torchvision", "swin_t", "declined", "2-D token map",
       reason="hierarchical: shifted windows over a 2-D token map, patch merging between stages"),
]


def case(key: str) -> Optional[Case]:
    return next((c for c in CASES if c.key == key), None)
