"""Offline searches above the rewrite: resolving recipe ``auto`` (:mod:`.auto`), scoring candidates
on calibration batches (:mod:`.score`), and ToMato's threshold-to-budget calibration (:mod:`.tomato_budget`)."""
