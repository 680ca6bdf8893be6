"""The graph stage: capture dynamo's graph, match transformer blocks by structure, and rewrite it
with merge nodes (one pass per file in :mod:`.passes`, driven by :mod:`.rewrite`)."""
