"""mergepass's own C++ kernels (built on first use) and their operator registrations."""
