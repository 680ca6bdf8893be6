"""Output fidelity of a compressed model against the uncompressed one."""
from __future__ import annotations

import torch


def _rows(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, (tuple, list)):
        t = t[0]
    t = t.detach().float()
    if t.dim() == 3:  # token features: use the first (CLS) token
        t = t[:, 0]
    return t.reshape(t.shape[0], -1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of outputs (CLS token for [B, N, C] features)."""
    return torch.nn.functional.cosine_similarity(_rows(a), _rows(b), dim=1)


def cosine_stats(c: torch.Tensor) -> dict:
    """mean, 5th percentile and min of per-sample cosines."""
    return dict(mean=c.mean().item(), p5=torch.quantile(c.float(), 0.05).item(), min=c.min().item())


def summary(out: torch.Tensor, ref: torch.Tensor, logits: bool = False) -> dict:
    """mean / 5th percentile / min cosine, max abs and relative error; top-1 agreement for ``logits``."""
    c = cosine(out, ref)
    a, b = _rows(out), _rows(ref)
    res = {f"cos_{k}": v for k, v in cosine_stats(c).items()}
    res.update(max_abs=(a - b).abs().max().item(), max_rel=((a - b).abs().max() / b.abs().max()).item())
    if logits:
        res["top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return res


def format_summary(s: dict) -> str:
    out = f"CLS cosine mean {s['cos_mean']:.4f} (p5 {s['cos_p5']:.4f}, min {s['cos_min']:.4f}), max abs err {s['max_abs']:.3g}"
    if "top1_agree" in s:
        out += f", top-1 agreement {100 * s['top1_agree']:.1f}%"
    return out
