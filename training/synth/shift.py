"""Shifted randomisation: draws pushed outside the training ranges, for held-out "shifted" test sets.

A data set drawn with ``shift = s > 0`` makes exactly the random draws it makes at ``s = 0`` (same
generators, same calls, same order) and maps the value of each shifted factor from its training range
into the band just outside it, so ``s = 0`` is the training distribution bit for bit and a shifted
study keeps the draws of its unshifted twin (split, age, sex, protocol-blind series, ...); only what
depends on the moved factors (e.g. where a lesion fits in the shifted head) can differ.

The bands have width ``s * (high - low)``, and the farther a draw lies from the range's low end
(one-sided) or centre (two-sided), the farther outside the range it lands, linearly:

- ``"high"``: ``[high, high + s (high - low)]`` (more deformation, more bias, more noise, coarser);
- ``"both"`` (two-sided factors): half of the band on each side, ``[low - s w/2, low]`` for the lower
  half of the range and ``[high, high + s w/2]`` for the upper half (``w = high - low``); for a range
  symmetric about 0, ``[-h, h]``, the magnitude moves from ``[0, h]`` to ``[h, (1 + s) h]``.

A range can be read in log scale (TR, TE) or as ``1 / value`` (an SNR, whose band is one of noise level).

A normally distributed draw (SD ``sd``) is read against the range of +-``NORMAL_RANGE_SD`` SD and
mapped two-sided through its own CDF. ``docs/synth.md`` lists the rule of every factor.
"""

from __future__ import annotations

import numpy as np
from scipy import special

# Beyond it the elastic field (SD 5 mm at shift 1) starts to fold: 5% of heads at 6 mm, 23% at 7 mm
# (none of 60 at 5 mm); see docs/synth.md.
MAX_SHIFT = 1.0
NORMAL_RANGE_SD = 3.0  # a normal draw's training range: +-3 SD, 99.7% of training draws
SIDES = ("high", "both")
# Scale a range is read in -> (to it, back): "log" for positive quantities whose spread is relative
# (TR, TE: a band is a factor beyond each end), "inverse" for an SNR (the band is one of noise level).
SCALES = {
    "linear": (lambda v: v, lambda v: v),
    "log": (np.log, np.exp),
    "inverse": (lambda v: 1.0 / np.asarray(v, dtype=np.float64), lambda v: 1.0 / v),
}


def check_shift(shift: float) -> None:
    """Check a data set's ``shift``.

    Raises:
        ValueError: ``shift`` outside [0, ``MAX_SHIFT``] (or NaN).
    """
    if not 0.0 <= shift <= MAX_SHIFT:
        raise ValueError(f"shift must be in [0, {MAX_SHIFT}], got {shift}")


def beyond(value: float | np.ndarray, low: float, high: float, shift: float, side: str = "high",
           scale: str = "linear") -> float | np.ndarray:
    """Map a training draw ``value`` in ``[low, high]`` into the band outside the range (module doc).

    Args:
        value: the draw, a float or an array of them.
        low, high: the training range the draw came from.
        shift: 0 returns ``value`` itself (the training draw), else the band width in range widths.
        side: ``"high"`` (band above the range) or ``"both"`` (half a band on each side).
        scale: ``SCALES`` key: the range and band are those of ``value`` (``"linear"``), of its log, or
            of ``1 / value`` (``"inverse"``: ``"high"`` is then the side of small values).

    Returns:
        ``value`` when ``shift == 0``, else the mapped value (an array for an array).

    Raises:
        ValueError: a bad ``shift``, ``side`` or ``scale``, or ``low >= high``.
    """
    check_shift(shift)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    if not low < high:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    if shift == 0.0:
        return value  # not a round trip through the scale: the training draw bit for bit
    to_scale, back = SCALES[scale]
    lo, hi = sorted((float(to_scale(low)), float(to_scale(high))))
    x = to_scale(value)
    if side == "high":
        mapped = hi + shift * (x - lo)
    else:
        centre = (lo + hi) / 2.0
        mapped = np.where(x >= centre, hi + shift * (x - centre), lo - shift * (centre - x))
    mapped = back(mapped)
    return mapped if np.ndim(mapped) else float(mapped)


def beyond_normal(value: float | np.ndarray, sd: float | tuple[float, ...], shift: float) -> float | np.ndarray:
    """Map a draw of N(0, ``sd``) outside +-``NORMAL_RANGE_SD`` SD, two-sided, keeping its sign.

    ``|value|`` has the CDF ``erf(|value| / (sd sqrt 2))``; that uniform position places it in
    ``[h, (1 + shift) h]``, ``h = NORMAL_RANGE_SD * sd``.

    Args:
        value: the draw, a float or an array (``sd`` broadcasts against it).
        sd: its standard deviation(s), > 0.
        shift: 0 returns ``value`` itself, else the band width in units of ``h``.

    Returns:
        ``value`` when ``shift == 0``, else the mapped value (an array for an array).

    Raises:
        ValueError: a bad ``shift`` or an ``sd`` <= 0.
    """
    check_shift(shift)
    if np.any(np.asarray(sd) <= 0):
        raise ValueError(f"sd must be > 0, got {sd}")
    if shift == 0.0:
        return value
    half = NORMAL_RANGE_SD * np.asarray(sd, dtype=np.float64)
    position = special.erf(np.abs(value) / (np.asarray(sd) * np.sqrt(2.0)))
    mapped = np.copysign(half * (1.0 + shift * position), value)
    return mapped if np.ndim(mapped) else float(mapped)
