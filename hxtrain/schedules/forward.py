"""The forward-only schedule of evaluation: plain data like the training schedules in `tables`, walked by the
same engine (`engine.executor.run_step(forward_only=True)`)."""

from __future__ import annotations

from dataclasses import dataclass

from hxtrain.schedules.tables import Schedule, ScheduleError, Task


@dataclass(frozen=True, kw_only=True)
class ForwardOnly(Schedule):
    """Evaluation: every stage's forward for every microbatch, in microbatch order; no backward. The executor runs
    the last stage's forward with the loss and holds no stage input (nothing will pull a gradient back), so a
    forward-only pass holds no activations between tasks. `virtual` matches the training schedule's so the same
    stages (and compiled programs) serve both."""

    name: str = "forward"

    def __post_init__(self):
        if self.split_backward or not (isinstance(self.virtual, int) and self.virtual >= 1):
            raise ScheduleError(f"ForwardOnly: virtual must be an int >= 1 and split_backward False, got "
                                f"{self.virtual!r}, {self.split_backward}")

    def _orders(self, sites, microbatches):
        return [[Task(d + c * sites, m, "F") for m in range(microbatches) for c in range(self.virtual)]
                for d in range(sites)]
