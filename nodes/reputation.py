"""A node's reputation (issue 20): one number from 0 to 1, 0.5 neutral, that routing reads
(``IDLECLAW_REPUTATION_FLOOR``: below it a node gets no consumer traffic).

``reputation_after`` is a pure function, applied by ``manage.py probe_nodes`` to each node it
judged in a round (nodes/probes.py). The figures, also in the README ("Reputation and probes"):

- **Decay.** First the old value moves toward 0.5 by the time since the last round that judged
  the node: half the distance every ``IDLECLAW_REPUTATION_HALF_LIFE_HOURS`` (24 h). Old
  evidence fades both ways: a node once caught is not barred for ever, a good record is not a
  licence.
- **Probes, the main signal.** Each passed probe closes a quarter of the gap to 1
  (0.5 → 0.625 → 0.72 → 0.79); each failed one takes away 40 % of what is left
  (0.5 → 0.3 → 0.18). With the default floor of 0.25 a neutral node is out of consumer traffic
  after two failures with no pass between, and one pass (0.18 → 0.39) brings it back.
- **Errors in real traffic.** Once the node answered at least ``MIN_REQUESTS`` requests, its
  error rate ``e`` (failed and timed-out over all) costs like ``e / 2`` of a failed probe: a node
  failing every request loses 20 % a round even while it passes probes.
- **No verdict.** A node probed in a round without a verdict (busy, alone with its model, a
  split pair) only decays (``decayed``), so one left below the floor with nobody to compare it
  to comes back above it in time (0.18 to 0.25 in about 8.5 h).
- **Cooldown.** A node cooling down (``COOLDOWN_AFTER`` failures in a row, routing/services.py)
  when judged costs like one more failed probe.
"""

from __future__ import annotations

from datetime import datetime

NEUTRAL = 0.5
PASS_STEP = 0.25  # share of the gap to 1 a passed probe closes
FAIL_STEP = 0.4  # share of the reputation a failed probe takes away
ERROR_WEIGHT = 0.5  # an error rate of 1 weighs half a failed probe
MIN_REQUESTS = 5  # fewer requests than this say nothing about an error rate


def decayed(reputation: float, *, since: datetime | None, now: datetime, half_life_hours: float
            ) -> float:
    """``reputation`` moved toward neutral for the time from ``since`` to ``now``."""
    value = _bounded(reputation)
    if since is None or now <= since:
        return value
    hours = (now - since).total_seconds() / 3600
    return NEUTRAL + (value - NEUTRAL) * 0.5 ** (hours / half_life_hours)


def reputation_after(
    reputation: float,
    *,
    probed_at: datetime | None,
    now: datetime,
    passed: int = 0,
    failed: int = 0,
    completed: int = 0,
    errors: int = 0,
    cooling: bool = False,
    half_life_hours: float = 24.0,
) -> float:
    """The reputation of a node after one probe round judged it (module docstring): decay
    from ``probed_at`` to ``now``, then ``passed`` and ``failed`` probes, then the error rate
    of its real traffic (``completed`` answers, ``errors`` failed or timed out) and whether it
    is ``cooling`` down. Always within 0 and 1."""
    value = decayed(reputation, since=probed_at, now=now, half_life_hours=half_life_hours)
    value = 1 - (1 - value) * (1 - PASS_STEP) ** max(passed, 0)
    value *= (1 - FAIL_STEP) ** max(failed, 0)
    total = max(completed, 0) + max(errors, 0)
    if total >= MIN_REQUESTS:
        value *= 1 - FAIL_STEP * ERROR_WEIGHT * (max(errors, 0) / total)
    if cooling:
        value *= 1 - FAIL_STEP
    return _bounded(value)


def _bounded(value: float) -> float:
    if value != value:  # NaN: a corrupted value is neutral, not a crash
        return NEUTRAL
    return min(1.0, max(0.0, float(value)))
