"""The graph rewrites, above the schedule: capture and prepare dynamo's graph (:mod:`.capture`), insert the
scheduled merges with fallback (:mod:`.merges`), and the FX passes themselves, one per file, in the order
:data:`.passes.ORDER` names."""
