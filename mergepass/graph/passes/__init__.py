"""FX graph passes, one per file: strip_noops → fold_scalars → expand_mha → (match) → insert_merges →
fix_token_literals, and replace_attention (a lowering choice, after merging)."""
from .expand_mha import expand_mha
from .fix_token_literals import RewriteError, fix_token_literals
from .fold_scalars import fold_scalars
from .insert_merges import insert_merges
from .replace_attention import replace_attention
from .strip_noops import strip_noops

__all__ = ["strip_noops", "fold_scalars", "expand_mha", "insert_merges", "fix_token_literals", "RewriteError",
           "replace_attention"]
