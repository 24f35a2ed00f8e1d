"""The teacher signal: what the trainer distils from, whichever kind of teacher produced it.

Every teacher (a local model, a top-k cache, a model served by vLLM) answers one question for a rollout: the
teacher's next-token distribution at each completion position, as a `DenseTeacher` (full logits) or a
`SparseTeacher` (top-K ids, log-probs and the log-mass of the rest). The losses and the fused kernel read these.
`LocalTeacher` (local.py) runs a model, `CachedTeacher` (cached.py) reads a cache, `ServedTeacher` (served.py) asks a
vLLM server; the last is imported on first use, so `import rlkd_onpolicy` stays light.
"""

from rlkd_onpolicy.teacher.cached import CachedTeacher
from rlkd_onpolicy.teacher.local import LocalTeacher
from rlkd_onpolicy.teacher.signal import DenseTeacher, SparseTeacher, Teacher, TeacherSignal

_SERVED = ("ServedTeacher", "ServerOptions", "TeacherServerError")

__all__ = ["CachedTeacher", "DenseTeacher", "LocalTeacher", "SparseTeacher", "Teacher", "TeacherSignal", *_SERVED]


def __getattr__(name: str):
    if name in _SERVED:
        from rlkd_onpolicy.teacher import served

        return getattr(served, name)
    raise AttributeError(f"module 'rlkd_onpolicy.teacher' has no attribute {name!r}")
