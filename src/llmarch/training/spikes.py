"""Loss spikes and gradient-norm outliers of a training run, against a robust rolling baseline.

A step is flagged when its value exceeds ``median + k * sigma`` of the ``window`` values before
it, with ``sigma = 1.4826 * MAD`` (the median absolute deviation, scaled to be the standard
deviation for normal noise). Median and MAD ignore the odd earlier spike and follow a
decreasing loss curve, so a smoothly falling loss is never flagged and one bad step is.

* **loss**: in linear space; sigma is floored at 1% of the median, so a perfectly flat history
  (MAD 0) does not turn the next tiny wiggle into a spike.
* **gradient norm**: in log space. Gradient norms vary multiplicatively (0.5 -> 1.0 is as large a
  change as 5 -> 10) and a spike is orders of magnitude, so log(norm) has a stable noise level
  along the run. Sigma is floored at 0.15 (log units): at k = 6 an outlier is at least
  e^0.9 ~ 2.5x the rolling median, so the ordinary 2x wobble of a tight history is not flagged.

Non-finite values (a NaN or inf loss) are always flagged and left out of later baselines.
"""

from __future__ import annotations

import math
import statistics

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): sigma = 1.4826 * MAD for normally distributed noise
LOSS_REL_FLOOR = 0.01  # loss: sigma >= 1% of the rolling median
LOG_GRAD_FLOOR = 0.15  # log grad norm: sigma >= 0.15, i.e. an outlier is >= e^(k * 0.15) x the median


def detect_spikes(
    values: list[float],
    window: int = 20,
    k: float = 6.0,
    min_history: int = 5,
    rel_floor: float = LOSS_REL_FLOOR,
    abs_floor: float = 0.0,
) -> list[int]:
    """Indices of ``values`` above ``median + k * sigma`` of the preceding ``window`` values.

    ``sigma = max(1.4826 * MAD, rel_floor * |median|, abs_floor)``. The first ``min_history``
    values (too little history for a baseline) are never flagged; non-finite values always are.
    """
    flagged = []
    for i, v in enumerate(values):
        if not math.isfinite(v):
            flagged.append(i)
            continue
        history = [h for h in values[max(0, i - window) : i] if math.isfinite(h)]
        if len(history) < min_history:
            continue
        med = statistics.median(history)
        mad = statistics.median(abs(h - med) for h in history)
        sigma = max(MAD_TO_SIGMA * mad, rel_floor * abs(med), abs_floor)
        if v > med + k * sigma:
            flagged.append(i)
    return flagged


def detect_grad_norm_outliers(norms: list[float], window: int = 20, k: float = 6.0, min_history: int = 5) -> list[int]:
    """Indices of gradient-norm outliers: :func:`detect_spikes` on ``log(norm)`` with sigma
    floored at :data:`LOG_GRAD_FLOOR` (a norm of 0 counts as a very small one, not an outlier)."""
    logs = [math.log(max(n, 1e-30)) if math.isfinite(n) else math.inf for n in norms]
    return detect_spikes(logs, window, k, min_history, rel_floor=0.0, abs_floor=LOG_GRAD_FLOOR)


__all__ = ["LOG_GRAD_FLOOR", "LOSS_REL_FLOOR", "MAD_TO_SIGMA", "detect_grad_norm_outliers", "detect_spikes"]
