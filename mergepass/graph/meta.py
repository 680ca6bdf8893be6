"""The ``node.meta`` keys mergepass's graph passes hand each other, and the invariants they rely on.

Written by mergepass:

* :data:`INSERTED` (``True``): on every node ``insert_merges`` and ``fix_token_literals`` add. A node
  that fails in ``fix_token_literals`` with this mark is mergepass's own (never the model's), and
  ``replace_attention`` treats a mask that carries it as proportional attention's float bias.
* :data:`UNMERGED_SHAPE` (a shape tuple): on proportional attention's bias, the shape it would have
  without merging, so that ``fix_token_literals`` recognises position tables added to it
  (``passes/position_tables.py``).

Read from dynamo's and torch's own keys: ``example_value`` (dynamo's fake value of a node: every
shape the matcher and the passes read; ``expand_mha`` fills it for the nodes it adds),
``val`` (the same after ``torch.export``), ``nn_module_stack`` (module paths: block names, linear
names for ``quantize.<engine>.keep_fp32``) and ``source_fn_stack`` (the quantizer's module of a node). The first
three are read and written only through :mod:`mergepass.graph.nodes`.

Invariants after :func:`mergepass.graph.capture.prepare`: every node that computes a tensor has
``example_value``; no inference dropout remains; multi-head attention modules are written out as SDPA.
After ``insert_merges`` the graph's outputs keep their unmerged shapes (the stream is unmerged where it
leaves the rewritten blocks).
"""
INSERTED = "mergepass"
UNMERGED_SHAPE = "unmerged_shape"
