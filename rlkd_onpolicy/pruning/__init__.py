"""Make a student from its teacher: width pruning by activation importance (Minitron) or a cut of its layers.

- `prune(teacher, calibration, intermediate_size=..., num_attention_heads=..., hidden_size=..., num_hidden_layers=...)`
  or `prune(teacher, calibration, params=81e6, axes=(...))`: width.py, scores from importance.py.
- `student_from_teacher(teacher, layers)`: depth.py, the layer cut.
- `python -m rlkd_onpolicy.pruning --teacher DIR --calibration FILE --params 81e6 --out DIR`: the CLI.

How the translation example's student was chosen between them: docs/pruning.md.
"""

from rlkd_onpolicy.pruning.depth import evenly_spaced_layers, student_from_teacher
from rlkd_onpolicy.pruning.importance import Importance, calibration_batches, measure_importance
from rlkd_onpolicy.pruning.width import (
    SUPPORTED_MODEL_TYPES,
    WIDTHS,
    count_parameters,
    prune,
    pruned_config,
    widths_for_params,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "WIDTHS",
    "Importance",
    "calibration_batches",
    "count_parameters",
    "evenly_spaced_layers",
    "measure_importance",
    "prune",
    "pruned_config",
    "student_from_teacher",
    "widths_for_params",
]
