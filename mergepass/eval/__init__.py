"""Evaluation on real data: image folders, models by name, recipes against the uncompressed model,
merge maps, and the timing loop the demo and the benchmarks share."""
