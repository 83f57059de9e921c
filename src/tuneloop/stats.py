"""Statistics shared by evaluation, the gateway's A/B report and the dashboard: intervals and significance tests
that say whether a difference is real."""

from __future__ import annotations

import math


def wilson_interval(rate: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` observed over `count` trials (95% for z=1.96)."""
    if count <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / count
    centre = (rate + z * z / (2 * count)) / denominator
    margin = z * math.sqrt(rate * (1 - rate) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)
