"""Fused attention kernels. Submodules import their toolchains (e.g. triton) lazily: nothing is imported here."""
