"""What mergepass reads from dynamo's FX graphs, below the merge methods and the schedule: nodes and their
``node.meta`` (:mod:`.nodes`, its only reader), transformer blocks matched by structure (:mod:`.match`) and
priced (:mod:`.cost`), and a graph as a module of the user's inputs (:mod:`.lift`). Nothing here rewrites a
graph: that is :mod:`mergepass.rewrite`."""
