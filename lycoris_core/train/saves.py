"""Which periodic saves to remove: sd-scripts' --save_last_n_steps rule, pure."""

from __future__ import annotations


def step_to_remove(step: int, save_last_n_steps: int, save_every_n_steps: int) -> int | None:
    """The step whose save sd-scripts removes right after saving at `step`, or None.

    sd-scripts keeps the saves of the last `save_last_n_steps` steps: at `step` it removes the
    save of step `step - n - 1` rounded down to a multiple of `save_every_n_steps` (nothing when
    that is negative or the option is off, n ≤ 0). E.g. every 10, last 30: at step 50 the save
    of step 10 goes, 20…50 stay."""
    if save_last_n_steps <= 0 or save_every_n_steps <= 0:
        return None
    k = step - save_last_n_steps - 1
    k -= k % save_every_n_steps
    return k if k >= 0 else None
