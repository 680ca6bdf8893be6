"""mergepass: a torch.compile backend that merges tokens (ToMe, DFE, LGTM, ToMato) and quantizes
pretrained Vision Transformers, with static schedules.

    model = torch.compile(model, backend=mergepass.backend(recipe="tome"))

Layout, one floor per stage: ``merge/`` (tensor math) → ``graph/`` (match: what is read from a graph) →
``methods/`` (merge-method registry) → ``schedule/`` → ``rewrite/`` (capture, merges, every graph pass in
``rewrite/passes/``) → ``quantize/`` (engine registry) → ``search/`` (recipe ``auto``) → ``lower`` →
``backend``; ``cli/`` and ``eval/`` sit on top.
"""
# `python -m mergepass.plan` needs a submodule named `plan`. Importing it here, before the function
# of the same name is bound below, keeps later imports of the submodule from replacing the function.
from . import plan as _plan_command  # noqa: F401,I001
from .artifact import load
from .backend import Backend, backend
from .errors import MergepassWarning
from .export import export
from .methods import MergeMethod, MergeOp, register_method, register_op
from .pipeline import plan
from .recipe import Quantize, Recipe, available as available_recipes, load as load_recipe
from .schedule import Schedule

__all__ = ["backend", "Backend", "plan", "export", "load", "Recipe", "Quantize", "load_recipe", "available_recipes",
           "Schedule", "MergepassWarning", "MergeMethod", "MergeOp", "register_method", "register_op"]
__version__ = "0.1.0"
