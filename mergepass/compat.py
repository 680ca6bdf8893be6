"""Private torch APIs mergepass relies on, each with the torch version it was checked against.
A torch upgrade starts by reading this file."""
from __future__ import annotations

from typing import Optional


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
