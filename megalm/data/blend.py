"""Deterministic blending: global sample n -> (source k, index of that sample within source k).

The weights become integers a_k summing to a period D (exact when the weights are rationals
with a common denominator <= MAX_PERIOD, e.g. 0.7/0.2/0.1 -> 7/2/1 of 10; otherwise rounded to
1/MAX_PERIOD). One period of the sequence is built with Tijdeman's chairman-assignment rule,
which keeps every prefix within 1 - 1/(2K-2) < 1 sample of the weights (Megatron's greedy
"largest deficit" rule can drift past 1). After a period every source has had exactly a_k
samples, so the period repeats and any n is located in O(1): start-up cost is O(D K), not
O(run length), and a resumed run needs no replay of the past.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

MAX_PERIOD = 1 << 13


def _integer_weights(weights: Sequence[float]) -> list[int]:
    total = float(sum(weights))
    norm = [w / total for w in weights]
    fracs = [Fraction(w).limit_denominator(MAX_PERIOD) for w in norm]
    period = math.lcm(*(f.denominator for f in fracs))
    if period <= MAX_PERIOD and sum(fracs) == 1 and all(abs(float(f) - w) < 1e-12 for f, w in zip(fracs, norm)):
        return [int(f * period) for f in fracs]
    # largest remainder at resolution 1/MAX_PERIOD; a positive weight keeps at least one slot
    raw = [w * MAX_PERIOD for w in norm]
    a = [max(1, int(math.floor(r))) for r in raw]
    order = sorted(range(len(a)), key=lambda k: (-(raw[k] - math.floor(raw[k])), k))
    i = 0
    while sum(a) < MAX_PERIOD:
        a[order[i % len(a)]] += 1
        i += 1
    while sum(a) > MAX_PERIOD:  # only when max(1, .) lifted tiny weights
        k = max(range(len(a)), key=lambda j: (a[j], -j))
        a[k] -= 1
    return a


def _chairman_period(a: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One period of the assignment: source of slot n and that source's count before slot n."""
    k_src = len(a)
    period = sum(a)
    src = np.empty(period, dtype=np.int64)
    before = np.empty(period, dtype=np.int64)
    if k_src == 1:
        src[:] = 0
        before[:] = np.arange(period)
        return src, before
    m = 2 * k_src - 2  # bound sigma = 1 - 1/m, all kept in integers
    c = [0] * k_src
    for n in range(1, period + 1):
        best = -1
        for k in range(k_src):
            # eligible: taking one more keeps c_k + 1 - n*lambda_k <= sigma
            if a[k] * n * m < period * (m * c[k] + 1):
                continue
            # earliest deadline (c_k + sigma) / lambda_k, compared by cross-multiplying
            if best < 0 or (m * c[k] + m - 1) * a[best] < (m * c[best] + m - 1) * a[k]:
                best = k
        src[n - 1] = best
        before[n - 1] = c[best]
        c[best] += 1
    assert c == a, "chairman assignment must fill each source's quota exactly per period"
    return src, before


class BlendIndex:
    """Maps global sample indices to (source, index within source) for fixed weights."""

    def __init__(self, weights: Sequence[float]):
        if not weights or any(not (w > 0) or math.isinf(w) for w in weights):
            raise ValueError(f"blend weights must be finite and > 0, got {list(weights)}")
        self.counts = _integer_weights(weights)  # a_k
        self.period = sum(self.counts)
        self._src, self._before = _chairman_period(self.counts)
        self._counts_np = np.asarray(self.counts, dtype=np.int64)

    @property
    def weights(self) -> list[float]:
        """The weights actually used (after rounding to the period)."""
        return [c / self.period for c in self.counts]

    def locate(self, n: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample(s) n -> (source ids, indices within each source); vectorised."""
        n = np.asarray(n, dtype=np.int64)
        p, o = np.divmod(n, self.period)
        src = self._src[o]
        return src, p * self._counts_np[src] + self._before[o]
