"""Merge math: pure tensor functions, no FX. See methods.py for the per-method entry points."""
from .bipartite import Matching, match, merge_sum, slots
from .ops import (SIMILARITIES, adjacent_merge, checkerboard, global_merge, similarity_metric, softmax_similarity,
                  window_layout, window_merge, window_order)
from .tokens import (attn_bias, class_attention, class_logits, gather_positions, init_state, key_metric, positions, representatives, unmerge,
                     update_source)

__all__ = ["Matching", "match", "merge_sum", "slots", "global_merge", "window_merge", "adjacent_merge",
           "checkerboard", "SIMILARITIES", "similarity_metric", "softmax_similarity", "window_layout", "window_order",
           "attn_bias", "class_attention", "class_logits", "init_state", "key_metric", "positions", "representatives", "gather_positions", "unmerge", "update_source"]
