"""The registered int8 engines (``quantize.engine = "auto"`` picks by each engine's ``priority``)."""
from .base import engine_names, get_engine, register_engine, resolve_engine
from . import modelopt_qdq, torchao_dynamic, pt2e  # noqa: E402,F401,I001  (register themselves)

__all__ = ["engine_names", "get_engine", "register_engine", "resolve_engine"]
