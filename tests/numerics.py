"""Float32 comparisons whose tolerance is a number of rounding units of the reference's scale.

Two float32 computations of the same quantity that group their sums differently (another layout,
padding, packing, sharding, recomputation, or the CPU's vector width: XLA vectorises reductions
for the instruction set it targets) differ by a few roundings of the *magnitudes summed*, not of
each result: an output near zero that came from cancelling terms of size ~1 carries the
absolute error of the terms. So the bound is `ulps` units of float32 epsilon times
max|reference| for every element; an `rtol`-style bound per element, or a fixed `atol`, fails
on those cancelled elements on some CPUs and not on others.
"""

from __future__ import annotations

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: one ulp of a number in [1, 2)


def assert_close_to_scale(actual, reference, ulps: float, err_msg: str = "") -> None:
    """Asserts |actual - reference| <= ulps * eps32 * max|reference| elementwise.

    `ulps` is the number of float32 rounding units (eps32 times the reference's largest
    magnitude, an upper bound on that element's ulp) that the arithmetic allows; say at the call
    why that many. The failure message gives the error observed in the same unit.
    """
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    tolerance = ulps * FLOAT32_EPS * scale
    if actual.shape == reference.shape and actual.size:
        observed = float(np.max(np.abs(actual - reference))) / (FLOAT32_EPS * scale or 1.0)
        err_msg += f" (error {observed:.3g} x eps32 x max|reference| {scale:.4g}; allowed {ulps})"
    np.testing.assert_allclose(actual, reference, rtol=0, atol=tolerance, err_msg=err_msg.strip())
