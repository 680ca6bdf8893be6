"""int8 post-training quantization of the merged graph, by a registered engine.

One engine per target, chosen by ``quantize.engine`` (``auto`` picks by lowering and device):

* ``pt2e`` (x86 CPU, :mod:`.pt2e`): torchao's ``X86InductorQuantizer``, static activation scales,
  inductor freezing → oneDNN ``qlinear``.
* ``torchao`` (CUDA, :mod:`.torchao_dynamic`): torchao ``quantize_`` → ``torch._int_mm``.
* ``modelopt`` (TensorRT, :mod:`.modelopt_qdq`): explicit Q/DQ nodes Torch-TensorRT converts.

Calibration always runs on the *merged* graph, so scales see the token statistics the int8
kernels see. Every engine returns a :class:`Quantized`; :mod:`mergepass.lower` compiles it.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import fx

from .base import QuantEngine, Quantized
from .config import Quantize
from .calibration import fit_batches, fit_to_graph, outlier_linears, read_calibration
from .engines import engine_names, get_engine, register_engine, resolve_engine


__all__ = ["quantize", "Quantize", "Quantized", "QuantEngine", "register_engine", "get_engine", "engine_names",
           "resolve_engine", "read_calibration", "fit_batches", "fit_to_graph", "outlier_linears"]


def quantize(gm: fx.GraphModule, example_inputs: Sequence, q: Quantize, lower: str,
             batches: Optional[list[tuple]] = None) -> Quantized:
    """Quantize the (merged) graph with ``q``'s engine (``lower``: where it is lowered, which ``engine = "auto"``
    follows); ``batches`` from :func:`read_calibration`."""
    return resolve_engine(q, lower, example_inputs).quantize(gm, example_inputs, q, batches)
