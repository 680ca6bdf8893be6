"""x86 CPU int8 with torchao's pt2e flow: ``X86InductorQuantizer`` (weights int8 per output channel;
activations uint8 with static per-tensor scales from calibration, or dynamic scales without
calibration data) → ``convert_pt2e``; inductor with ``freezing=True`` then fuses the q/dq patterns
into oneDNN ``qlinear`` kernels.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import torch
from torch import fx

if TYPE_CHECKING:
    from .config import Quantize

from .. import compat
from ..config import check_choice
from ..cpu import bf16_isa, int8_isa, machine
from ..decide import Decision
from ..errors import MergepassWarning
from ..stages import progress, stage
from ..graph.lift import Inputs, Lifted, path_matches
from ..graph.nodes import SDPA, has_meta, module_paths, source_fn
from ..rewrite import passes
from ..rewrite.passes import int8_attention
from ..rewrite.passes.affine_batch_norms import affine_batch_norms
from ..rewrite.passes.explicit_conv_padding import explicit_conv_padding
from .base import EngineConfig, QuantEngine, Quantized, check_keep_fp32, check_sensitivity, register_engine
from .calibration import fit_batches, outlier_linears


# oneDNN's dynamic qlinear takes one scale per tensor: the whole batch shares it
DYNAMIC_COST = ("slower, and each activation's scale is shared by the whole batch, so one image with outlying "
                "values coarsens every other image's int8 steps and one NaN or inf image makes every output NaN")


def _torchao_pt2e():
    try:
        return compat.torchao_pt2e()
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise RuntimeError("int8 recipes need torchao (pip install torchao)") from e


def _excluder(patterns: Iterable[str]) -> Callable[[fx.Node], bool]:
    pats = list(patterns)

    def exclude(n: fx.Node) -> bool:
        return any(path_matches(name, pats) for name in module_paths(n))
    return exclude


def rest_dtype(rest: str) -> Optional[torch.dtype]:
    """The dtype the non-GEMM ops run in around oneDNN's int8 kernels (None: FP32). bf16 is fast only
    with AVX512-BF16 or AMX; elsewhere oneDNN emulates it, so ``auto`` keeps FP32 there."""
    if rest == "bf16" or (rest == "auto" and bf16_isa() not in ("none", "?")):
        return torch.bfloat16
    return None


def rest_decision(rest: str) -> Optional[Decision]:
    """What ``quantize.pt2e.rest = "auto"`` chose, said as what it is: a default by instruction set, not measured
    (timing it takes two int8 compiles of the model; ``benchmarks/speed.py`` times ``int8`` against
    ``int8:quantize.pt2e.rest=fp32``)."""
    if rest != "auto":
        return None
    choice = "bf16" if rest_dtype(rest) is not None else "fp32"
    return Decision("rest precision", choice, measured=False, machine=machine(),
                    declined={"rule": f"bf16 where the CPU has native bf16 (here: {bf16_isa()})"})


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX)."""
    isa = int8_isa()
    if isa == "?":  # no /proc/cpuinfo: judge by the kernels PyTorch picked
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")
    return isa != "none"


def attention_unavailable(choice: str, mode: str) -> Optional[str]:
    """Why attention stays in floating point for ``quantize.pt2e.attention = choice`` (None: it runs int8)."""
    if choice != "int8":
        return f"quantize.pt2e.attention = {choice!r}"
    if mode != "static":
        return "the fused int8 attention needs static (calibrated) activation scales"
    return int8_attention.unavailable()


def _from_sdpa(n: fx.Node) -> bool:
    """Whether a node was traced from an attention rewritten by int8_attention (its source is the SDPA call)."""
    return source_fn(n) in SDPA


def activation_config(dynamic: bool, reduce_range: bool, observer: str, narrow_weights: bool = False):
    """torchao's default x86 config, with static activation ranges from ``observer`` (``minmax`` or
    ``histogram``, torchao's default); ``narrow_weights``: weights in [-63, 63] (7 bits)."""
    _, _, xiq = _torchao_pt2e()
    cfg = xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic, reduce_range=reduce_range)
    if narrow_weights:
        cfg = dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, quant_min=-63, quant_max=63))
    if dynamic or observer == "histogram":
        return cfg
    from torchao.quantization.pt2e import MinMaxObserver
    act = dataclasses.replace(cfg.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return dataclasses.replace(cfg, input_activation=act, output_activation=act)


def make_quantizer(dynamic: bool, exclude: Optional[Callable[[fx.Node], bool]] = None, matmuls: bool = False,
                   observer: str = "auto", seven_bits: str = "auto"):
    """X86InductorQuantizer with the default config and ``observer``'s activation ranges; nodes for which
    ``exclude`` holds stay fp32;
    ``matmuls``: the matmuls of rewritten attentions too (no others), with full 8-bit activations (the fused int8 attention
    kernel accumulates in int32 or FP32, so the saturation below does not arise there).

    Without VNNI, oneDNN multiplies u8 activations by s8 weights with 16-bit saturating pair sums
    (``vpmaddubsw``), which overflow when both use 8 bits: there ``seven_bits`` names the operand that keeps 7,
    by default the weights (in [-63, 63], per channel), so that activations keep 8 bits and their range
    (``activations``: torchao's ``reduce_range``).

    ``observer = "auto"``: on DINOv2 the rare large activations carry the features, so the linears'
    8-bit activations keep their min/max range; 7-bit ones have too few levels for that, and attention's
    q/k/v and probabilities lose more to min/max than to clipping, so both take the histogram
    (``docs/archive/benchmarks-history.md``, "Activation ranges")."""
    _, _, xiq = _torchao_pt2e()

    def skip(n: fx.Node) -> bool:
        return ((exclude is not None and exclude(n))
                or (matmuls and n.target == torch.ops.aten.matmul.default and not _from_sdpa(n)))

    class Quantizer(xiq.X86InductorQuantizer):
        def annotate(self, model):
            for n in model.graph.nodes:
                if n.op == "call_function" and not has_meta(n, xiq.QUANT_ANNOTATION_KEY) and skip(n):
                    compat.annotate_not_quantize(n)
            return super().annotate(model)

    q = Quantizer()
    narrow = None if cpu_has_vnni() else SEVEN_BIT_DEFAULT if seven_bits == "auto" else seven_bits
    reduce_range = narrow == "activations"
    auto = observer == "auto"
    q.set_global(activation_config(dynamic, reduce_range, ("histogram" if reduce_range else "minmax") if auto else observer,
                                   narrow_weights=narrow == "weights"))
    if matmuls:
        q.set_function_type_qconfig(torch.matmul, activation_config(dynamic, False, "histogram" if auto else observer))
    return q


REST_PRECISIONS = ("auto", "fp32", "bf16")
SEVEN_BITS = ("auto", "activations", "weights")
SEVEN_BIT_DEFAULT = "weights"  # DINOv2 ViT-S/14, 64 tuning images, AMD EPYC Zen 3: int8 CLS cosine 0.9974 against 0.9948
ATTENTION_PRECISIONS = ("float", "int8")
OBSERVERS = ("auto", "minmax", "histogram")


@dataclasses.dataclass(frozen=True)
class PT2EConfig(EngineConfig):
    """The pt2e (x86) engine's fields."""

    keep_fp32: tuple[str, ...] = ()  # linears kept in fp32, by module path glob ("blocks.2.mlp.fc2", "*.fc2")
    sensitivity: float = 0.0      # >0: also keep linears whose input max/p99.9 ratio exceeds this
    rest: str = "auto"            # what runs outside the int8 GEMMs: bf16 | fp32 | auto (bf16 where the CPU
                                  # has AVX512-BF16 or AMX)
    attention: str = "float"      # float (the rest's precision) | int8 (torchao's fused int8 SDPA; costs fidelity)
    observer: str = "auto"        # static activation ranges: minmax (calibration min/max) | histogram (torchao's
                                  # default: least quantization error on a histogram) | auto (minmax for the
                                  # linears' 8-bit activations; histogram for 7-bit ones and int8 attention)

    seven_bits: str = "auto"      # which int8 operand keeps 7 bits on CPUs without int8 dot products, where oneDNN's
                                  # 16-bit pair sums would saturate: activations | weights | auto (ignored with VNNI/AMX)

    def validate(self) -> None:
        check_choice("quantize.pt2e.seven_bits", self.seven_bits, SEVEN_BITS)
        check_keep_fp32(self.keep_fp32, "pt2e")
        check_sensitivity(self.sensitivity, "pt2e")
        check_choice("quantize.pt2e.rest", self.rest, REST_PRECISIONS)
        check_choice("quantize.pt2e.observer", self.observer, OBSERVERS)
        check_choice("quantize.pt2e.attention", self.attention, ATTENTION_PRECISIONS)


class PT2E(QuantEngine):
    """The x86 CPU default: static (calibrated) or dynamic activation scales, oneDNN ``qlinear``."""

    name = "pt2e"
    config = PT2EConfig
    priority = 10  # built in: a registered engine needs a higher priority to take "auto" over

    def is_default(self, lower: str, on_cuda: bool) -> bool:
        return lower != "tensorrt" and not on_cuda

    def quantize(self, gm: fx.GraphModule, example_inputs: Sequence, q: "Quantize",
                 batches: Optional[list[tuple]]) -> Quantized:
        prepare_pt2e, convert_pt2e, _ = _torchao_pt2e()
        user_ex = Inputs(gm, example_inputs).user_inputs(example_inputs)
        own = q.options(self.name)
        batches = fit_batches(batches, user_ex) if q.mode == "static" else None
        mode = q.mode
        if mode == "static" and not batches:
            why = "no calibration data fits this graph" if batches is None else "the calibration data is smaller than one batch"
            warnings.warn(f"mergepass: static int8 needs calibration data, but {why}; using dynamic "
                          f"(per-batch) activation scales instead: {DYNAMIC_COST}. Pass calibration=... to "
                          "mergepass.backend.", MergepassWarning, stacklevel=3)
            mode = "dynamic"
        elif mode == "dynamic":
            warnings.warn(f"mergepass: quantize.mode = 'dynamic': {DYNAMIC_COST}; static scales (calibration=...) "
                          "have neither cost", MergepassWarning, stacklevel=3)
        why_float = attention_unavailable(own.attention, mode)
        if why_float and own.attention == "int8":
            warnings.warn(f"mergepass: quantize.pt2e.attention = 'int8' cannot run here: {why_float}; attention runs "
                          "in floating point", MergepassWarning, stacklevel=3)
        fused = 0
        if why_float is None:
            gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # the caller's graph keeps its SDPA
            fused, _ = passes.run(int8_attention.decompose_attention, gm)
        lifted = Lifted(gm, example_inputs).eval()
        # export traces on its own: guards it derives must not join those of dynamo's frame
        with stage("int8: export and prepare"), torch.no_grad(), compat.outside_tracing():
            exported = torch.export.export(lifted, user_ex, dynamic_shapes=lifted.dynamic_shapes(),
                                           strict=False).module(check_guards=False)  # dynamo guards the inputs
            kept = list(own.keep_fp32)
            if own.sensitivity > 0:
                kept += outlier_linears(exported, batches or [user_ex], own.sensitivity)
            passes.run(explicit_conv_padding, exported)
            passes.run(affine_batch_norms, exported)
            m = prepare_pt2e(exported, make_quantizer(mode == "dynamic", _excluder(kept) if kept else None,
                                                      matmuls=fused > 0, observer=own.observer,
                                                      seven_bits=own.seven_bits))
        runs = batches if mode == "static" else [user_ex]
        with stage("int8: calibrate"), torch.no_grad():
            for b in progress(runs, "calibrating", total=len(runs)):
                m(*b)
        with stage("int8: convert"), torch.no_grad():
            m = convert_pt2e(m)
        return Quantized(m, lifted.user_idx, user_ex, self.name, mode, kept, autocast=rest_dtype(own.rest),
                         inductor_config={**compat.torchao_x86_passes(), **(int8_attention.inductor_passes(fused) if fused else {})},
                         int8_attention=fused)


register_engine(PT2E())
