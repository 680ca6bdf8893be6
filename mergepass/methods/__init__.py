"""Merge methods, one per file, in a registry (see :mod:`.base`). Importing this package registers
the built-in ones: ToMe, DFE, DFE+LGTM, ToMato, ToMato+ToMe and soft many-to-many merging."""
from .base import (AUTO, MERGE_KERNELS, RESERVED, BlockSchedule, Merge, MergeMethod, MergeOp, MergeSpec,
                   MethodConfig, NoConfig, RConfig, all_ops, check_method, config_of, get_method, get_op, method_names,
                   register_method, register_op)
from . import tome, dfe, dfe_lgtm, tomato, soft  # noqa: E402,F401,I001  (register themselves, in this order)
from .tome import ToMeConfig  # noqa: E402
from .dfe import DFEConfig  # noqa: E402
from .dfe_lgtm import DFELGTMConfig  # noqa: E402
from .tomato import ToMatoConfig, ToMatoToMeConfig  # noqa: E402
from .soft import SoftConfig  # noqa: E402

__all__ = ["AUTO", "MERGE_KERNELS", "RESERVED", "BlockSchedule", "Merge", "MergeMethod", "MergeOp", "MergeSpec",
           "MethodConfig", "NoConfig", "RConfig", "ToMeConfig", "DFEConfig", "DFELGTMConfig", "ToMatoConfig",
           "ToMatoToMeConfig", "SoftConfig", "register_method", "register_op", "get_method", "get_op", "method_names",
           "all_ops", "config_of", "check_method"]
