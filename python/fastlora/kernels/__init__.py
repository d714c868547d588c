"""Triton GPU kernels of fastlora (`fastlora.kernels`), one module per op.

The repository's top-level `kernels/` holds links to these modules: maturin ships only the
Python package tree in the wheel (a link pointing the other way is left out), so the kernels
live inside the package and an installed wheel imports them.
"""
