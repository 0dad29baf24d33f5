"""The non-finite step guard: a step whose loss or gradient norm is not finite is skipped,
counted and reported, and too many in a row stop the run before a bad state can be saved."""

from __future__ import annotations

import warnings


class NonFiniteTraining(RuntimeError):
    """Raised when too many consecutive steps produced a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps (``skipped`` in all, ``bad_steps`` in a row) and raises
    :class:`NonFiniteTraining` at ``max_bad_steps`` in a row."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.skipped = 0

    def passed(self) -> None:
        self.bad_steps = 0

    def skip(self, step: int, what: str, report: bool = True, checkpoint=None) -> None:
        """Count a skipped ``step`` whose ``what`` ("loss", "gradient norm") was not finite;
        ``report``: warn (one rank warns for all); ``checkpoint``: the last good checkpoint on
        disk, if any, named when training stops."""
        self.bad_steps += 1
        self.skipped += 1
        if report:
            warnings.warn(f"step {step}: non-finite {what}, step skipped ({self.skipped} skipped so far, "
                          f"{self.bad_steps} in a row; training stops at {self.max_bad_steps})", stacklevel=4)
        if self.bad_steps >= self.max_bad_steps:
            kept = (f"the last good checkpoint {checkpoint} is left untouched" if checkpoint is not None
                    else "no checkpoint was written")
            raise NonFiniteTraining(f"{self.bad_steps} consecutive non-finite steps at step {step}; {kept}. Lower the "
                                    "learning rate or check the data for NaN / huge values")
