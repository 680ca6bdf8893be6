"""FX graph passes, one per file: strip_noops → expand_mha → (match) → insert_merges → fix_token_literals."""
from .expand_mha import expand_mha
from .fix_token_literals import RewriteError, fix_token_literals
from .insert_merges import insert_merges
from .strip_noops import strip_noops

__all__ = ["strip_noops", "expand_mha", "insert_merges", "fix_token_literals", "RewriteError"]
