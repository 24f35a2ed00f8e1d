"""Range checks of the frozen specs (`LossSpec`, `SamplingSpec`), with one error type that names the field.

A spec raises `InvalidField("LossSpec", "rank_weight", -1.0, "it must be ≥ 0 ...")`, whose message reads
"LossSpec.rank_weight=-1.0 is invalid: it must be ≥ 0 ..."; `RLKDConfig` catches it and names its own field instead
(rank_regularization_strength for `regularization_strength`), so each rule is written once.
"""

import math
from typing import Any


class InvalidField(ValueError):
    """`owner.field=value is invalid: rule`; `field`, `value` and `rule` are kept for a caller that renames."""

    def __init__(self, owner: str, field: str, value: Any, rule: str):
        super().__init__(f"{owner}.{field}={value!r} is invalid: {rule}")
        self.field, self.value, self.rule = field, value, rule


def check_choice(owner: str, field: str, value: Any, choices: tuple, why: str = "") -> None:
    if value not in choices:
        raise InvalidField(owner, field, value, f"{why}use one of {choices}.")


def check_number(
    owner: str, field: str, value: Any, low: float, high: float | None = None, *, above: bool = False, note: str = ""
) -> None:
    """`value` is a finite number in [low, high] (`above`: low excluded; high None: unbounded), else InvalidField."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidField(owner, field, value, "it must be a finite number.")
    if (value <= low if above else value < low) or (high is not None and value > high):
        opening = "(" if above else "["
        limits = f"in {opening}{low:g}, {high:g}]" if high is not None else f"{'>' if above else '≥'} {low:g}"
        raise InvalidField(owner, field, value, f"it must be {limits}{note}.")


def check_count(owner: str, field: str, value: Any) -> None:
    """`value` is an int ≥ 1, else InvalidField."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidField(owner, field, value, "it must be an int ≥ 1.")
