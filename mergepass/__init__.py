"""mergepass: a torch.compile backend that merges tokens (ToMe, DFE, LGTM, ToMato) and quantizes
pretrained Vision Transformers, with static schedules.

    model = torch.compile(model, backend=mergepass.backend(recipe="tome"))
"""
from .backend import Backend, backend
from .export import export
from .planning import plan
from .recipe import Quantize, Recipe, available as available_recipes, load as load_recipe
from .rewrite import MergepassWarning
from .schedule import Schedule

__all__ = ["backend", "Backend", "plan", "export", "Recipe", "Quantize", "load_recipe", "available_recipes",
           "Schedule", "MergepassWarning"]
__version__ = "0.1.0"
