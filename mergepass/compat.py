"""Every private torch, inductor and torchao API mergepass relies on, each with the version it was written
for: a torch or torchao upgrade starts by reading this file (tests/test_architecture.py keeps it the only one).

Documented by torch, so left at their call sites: torch._inductor.config, torch._dynamo.mark_dynamic, torch._dynamo.reset.

Private modules are imported inside the functions: ``import mergepass`` loads no inductor or torchao
module.
"""
from __future__ import annotations

import functools
from typing import Callable, ContextManager, Optional

import torch

# dynamo


def frame_compiles() -> Optional[int]:
    """How many times dynamo has compiled the frame it is compiling now, this one included (torch 2.14.1:
    ``torch._guards.CompileContext``); None outside a dynamo compile."""
    from torch._guards import CompileContext
    cid = CompileContext.current_compile_id()
    n = getattr(cid, "frame_compile_id", None)
    return None if n is None else n + 1


def recompile_limit() -> int:
    """dynamo's limit on compiles per frame (torch 2.14.1: ``torch._dynamo.config.recompile_limit``)."""
    import torch._dynamo
    return int(torch._dynamo.config.recompile_limit)


def recompile_limit_patch(limit: int) -> ContextManager:
    """A block in which dynamo's limit on compiles per frame is ``limit`` (torch 2.14.1:
    ``torch._dynamo.config.patch(recompile_limit=...)``)."""
    import torch._dynamo
    return torch._dynamo.config.patch(recompile_limit=limit)


def outside_tracing() -> ContextManager:
    """A block with no dynamo tracing context, so that ``torch.export`` and AOTInductor called from a backend
    trace on their own (torch 2.14.1: ``torch._guards.tracing(None)``)."""
    from torch._guards import tracing
    return tracing(None)


def pattern_matcher_count() -> int:
    """How many pattern matches inductor's passes have applied in this process (torch 2.14.1:
    ``torch._dynamo.utils.counters["inductor"]["pattern_matcher_count"]``)."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["pattern_matcher_count"]


def fake_mode():
    """A fake-tensor mode that also accepts real tensors (torch 2.14.1:
    ``torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_mode_of(value):
    """The fake mode that made dynamo's fake tensor ``value`` (torch 2.14.1: ``FakeTensor.fake_mode``), in which ops on
    it keep their symbolic sizes; None for any other value."""
    return getattr(value, "fake_mode", None) if isinstance(value, torch.Tensor) else None


def module_state_input(source) -> Optional[bool]:
    """Whether dynamo lifted a placeholder from module state or a global rather than from the frame's own
    arguments, by ``source``, where dynamo found it (:func:`mergepass.graph.nodes.input_source`; torch 2.14.1:
    ``torch._dynamo.source``); None for no source."""
    from torch._dynamo.source import NNModuleSource, ParamBufferSource, is_from_local_source
    if source is None:
        return None
    chain = []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    if any(isinstance(s, (NNModuleSource, ParamBufferSource)) for s in chain):
        return True
    return not is_from_local_source(chain[0], only_allow_input=True)


# ATen and the dispatcher

# the C functions behind F.linear and F.scaled_dot_product_attention, as dynamo's graphs may name them
# (torch 2.14.1: ``torch._C._nn``)
C_LINEAR = torch._C._nn.linear
C_SDPA = torch._C._nn.scaled_dot_product_attention


def assert_tensor_metadata_op():
    """The op ``torch.export`` records its dtype checks as (torch 2.14.1: ``aten._assert_tensor_metadata``)."""
    return torch.ops.aten._assert_tensor_metadata.default


def has_cpu_kernel(op: str) -> bool:
    """Whether the operator ``op`` (``"namespace::name"``) has a CPU kernel registered (torch 2.14.1:
    ``torch._C._dispatch_has_kernel_for_dispatch_key``)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


def destroy_library(lib: torch.library.Library) -> None:
    """Remove the kernels ``lib`` registered (torch 2.14.1: ``Library._destroy``)."""
    lib._destroy()


def amx_tiles() -> bool:
    """Whether the CPU has AMX and the OS enables its tiles, asked as torchao 0.18.0's qsdpa lowering asks it
    (torch 2.14.1: ``torch.cpu._is_amx_tile_supported``; ``torch._C._cpu``'s first where it exists)."""
    cpu = getattr(torch._C, "_cpu", None)
    check = getattr(cpu, "_is_amx_tile_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


# inductor

# the inductor settings that hold custom graph passes (torch 2.14.1; the last two are private)
INDUCTOR_CUSTOM_PASSES = ("pre_grad_custom_pass", "post_grad_custom_pre_pass", "post_grad_custom_post_pass",
                          "joint_custom_pre_pass", "joint_custom_post_pass", "_pre_fusion_custom_pass",
                          "_post_fusion_custom_pass")


def compile_fx(gm: torch.nn.Module, example_inputs: list) -> Callable:
    """Inductor's compile of a dynamo graph (torch 2.14.1: ``torch._inductor.compile_fx.compile_fx``)."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx
    return inductor_compile_fx(gm, example_inputs)


def aoti_compile_and_package(exported: "torch.export.ExportedProgram", package_path: str) -> str:
    """AOTInductor: compile ``exported`` into a ``.pt2`` package (torch 2.14.1:
    ``torch._inductor.aoti_compile_and_package``)."""
    import torch._inductor
    return torch._inductor.aoti_compile_and_package(exported, package_path=package_path)


def aoti_load_package(path: str) -> Callable:
    """Load a ``.pt2`` package (torch 2.14.1: ``torch._inductor.aoti_load_package``), a CPU package's constants
    moved to 64-byte-aligned memory (:func:`align_cpu_constants`)."""
    import torch._inductor
    model = torch._inductor.aoti_load_package(path)
    align_cpu_constants(model, path)
    return model


def aoti_input_count(model) -> Optional[int]:
    """How many inputs a loaded package takes, as AOTInductor's call spec records it (torch 2.14.1:
    ``AOTIModelPackageLoader.get_call_spec``, a ``torch.utils._pytree`` spec of ``(args, kwargs)``); None where
    it cannot be read."""
    from torch.utils import _pytree
    try:
        args, kwargs = _pytree.treespec_loads(model.loader.get_call_spec()[0]).children()
        return args.num_leaves + kwargs.num_leaves
    except Exception:  # noqa: BLE001 - a spec this torch writes otherwise: no count, not an error
        return None


ALIGNMENT = 64


def align_cpu_constants(model, path: str) -> bool:
    """Give a loaded CPU package's constants 64-byte-aligned memory; False where it kept them as loaded.

    AOTInductor (torch 2.14.1, ``aoti_runtime/model_base.h``) copies a CPU package's constants into one block
    from ``std::malloc``, which glibc aligns to 16 bytes, so every weight starts at 16 mod 64. oneDNN's AMX int8
    GEMMs read weights there about 1.2x slower (DINOv2 ViT-S/14 int8, batch 8, AMX Xeon: 81 ms against 65 ms).
    A second runner over the package's shared library reads the constants
    (``torch._C._aoti.AOTIModelContainerRunnerCpu.extract_constants_map``, keyed by original FQN, while the update
    is keyed by constant name: ``get_constant_names_to_original_fqns``); copies in torch's 64-byte-aligned
    memory replace them as user-managed buffers (``AOTIModelPackageLoader.update_constant_buffer``), which
    ``model`` keeps alive. The first block stays allocated. Best effort: should any step fail, the package runs
    as loaded, which is correct, only slower."""
    import collections
    import tempfile
    import zipfile
    loader = getattr(model, "loader", None)
    try:
        if loader is None or loader.get_metadata().get("AOTI_DEVICE_KEY") != "cpu":
            return False
        with tempfile.TemporaryDirectory() as d, zipfile.ZipFile(path) as z:
            libs = [n for n in z.namelist() if n.endswith(".so")]
            if len(libs) != 1:
                return False
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(z.extract(libs[0], d), 1)
            # extracted by original FQN ("module.c5"), updated by constant name ("module_c5"); an FQN that
            # several constants share (int8 packages: "x_scale" of every quantized input) extracts only one of
            # them, so those stay as loaded
            fqns = runner.get_constant_names_to_original_fqns()
            shared = {f for f, n in collections.Counter(fqns.values()).items() if n > 1}
            name_of = {fqn: name for name, fqn in fqns.items() if fqn not in shared}
            constants = {name_of[k]: v.clone() for k, v in runner.extract_constants_map(False).items()
                         if k in name_of}
            del runner
        if not constants:
            return False
        loader.update_constant_buffer(constants, False, False, True)
    except Exception:  # noqa: BLE001 - an optimisation: the loaded package is already correct
        return False
    model._mergepass_aligned_constants = constants  # user-managed: the runner holds only their addresses
    return True


def custom_graph_pass() -> type:
    """The base class whose ``uuid()`` lets inductor's caches key on a custom pass (torch 2.14.1:
    ``torch._inductor.custom_graph_pass.CustomGraphPass``)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return CustomGraphPass


def inductor_cache_dir() -> str:
    """Inductor's cache directory (torch 2.14.1: ``torch._inductor.runtime.cache_dir_utils.cache_dir``)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


# torchao


def torchao_pt2e() -> tuple:
    """``(prepare_pt2e, convert_pt2e, x86_inductor_quantizer)`` (torchao 0.18.0). Importing the quantizer
    registers inductor's int8 fusion patterns and also sets inductor's global ``pre_grad_custom_pass``:
    that is restored here, and :func:`torchao_x86_passes` sets it per compile instead."""
    from torch._inductor import config as inductor_config
    with inductor_config.patch(pre_grad_custom_pass=inductor_config.pre_grad_custom_pass):
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    return prepare_pt2e, convert_pt2e, xiq


def annotate_not_quantize(node: torch.fx.Node) -> None:
    """Mark ``node`` to stay in floating point, the mark ``set_module_name_qconfig(None)`` uses (torchao 0.18.0:
    ``x86_inductor_quantizer._annotate_nodes_not_quantize``)."""
    torchao_pt2e()[2]._annotate_nodes_not_quantize(node)


def torchao_x86_passes() -> dict:
    """The inductor settings torchao's x86 int8 lowering expects, which its import sets globally (torchao 0.18.0:
    ``pre_grad_custom_pass = torchao.quantization.pt2e.inductor_passes.x86.quant_lift_up``)."""
    from torchao.quantization.pt2e.inductor_passes.x86 import quant_lift_up
    return {"pre_grad_custom_pass": quant_lift_up}


@functools.cache
def torchao_qsdpa_fusion() -> Callable:
    """torchao's x86 quantized-SDPA fusion, as a post-grad pass holding only its patterns (torchao 0.18.0:
    ``torchao.prototype.inductor.fx_passes.qsdpa_fusion``)."""
    from torch._inductor import config as inductor_config
    from torchao.prototype.inductor.fx_passes.qsdpa_fusion import _qsdpa_init, custom_pass
    with inductor_config.patch(post_grad_custom_pre_pass=custom_pass):
        _qsdpa_init()  # registers its patterns into the pass set while patched
    return custom_pass
