"""Integer padding for ``conv2d(padding="valid"|"same")`` in an exported graph: the form torchao's x86 quantizer
annotates."""
from __future__ import annotations

import torch
from torch import fx

from ...graph.nodes import exported_value


def explicit_conv_padding(gm: fx.GraphModule) -> int:
    """Rewrite ``conv2d(padding="valid"|"same")`` (``aten.conv2d.padding``, as in Hugging Face SigLIP)
    as ``aten.conv2d.default`` with integer padding: X86InductorQuantizer accepts only the latter.
    Returns the number rewritten; a "same" padding that is not symmetric is left as it is."""
    done = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != torch.ops.aten.conv2d.padding:
            continue
        defaults = (None, [1, 1], "valid", [1, 1], 1)  # bias, stride, padding, dilation, groups
        x, w, b, stride, padding, dilation, groups = tuple(n.args) + defaults[len(n.args) - 2:]
        if padding == "valid":
            pad = [0, 0]
        else:
            k = exported_value(w).shape[-2:]
            dil = list(dilation) * (2 // len(dilation))
            if any(d * (kk - 1) % 2 for d, kk in zip(dil, k)):
                continue
            pad = [d * (kk - 1) // 2 for d, kk in zip(dil, k)]
        n.target = torch.ops.aten.conv2d.default
        n.args = (x, w, b, stride, pad, dilation, groups)
        done += 1
    if done:
        gm.recompile()
    return done
