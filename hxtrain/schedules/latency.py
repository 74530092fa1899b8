"""The latency-aware variants' shared pieces: `1f1b:k` and `zb-h1:k` (`schedules.tables`) keep k more
microbatches in flight on every site but the last, so that a site waiting for a cotangent over a slow link still
has forwards to run."""

from __future__ import annotations

from hxtrain.schedules.simulate import ScheduleError


def name_extra(sched, cls: str, base: str) -> None:
    """A latency-aware variant's `extra` (an int >= 0) checked, and its name set: `base`, or `base:k`."""
    if not isinstance(sched.extra, int) or isinstance(sched.extra, bool) or sched.extra < 0:
        raise ScheduleError(f"{cls}: extra must be an int >= 0 (microbatches in flight beyond {base}'s), got "
                            f"{sched.extra!r}")
    if not sched.name:
        object.__setattr__(sched, "name", base if sched.extra == 0 else f"{base}:{sched.extra}")


def latency_extra(round_trip_s: float, microbatch_s: float) -> int:
    """The extra warm-up of the latency-aware 1F1B: microbatches whose F + B (`microbatch_s`) cover a link's round
    trip, ceil(round_trip / microbatch_s); 0 for a free link."""
    if round_trip_s <= 0:
        return 0
    if not microbatch_s > 0:
        raise ValueError(f"microbatch_s: expected a time > 0, got {microbatch_s!r}")
    return int(-(-round_trip_s // microbatch_s))
