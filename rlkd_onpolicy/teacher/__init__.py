"""The teacher signal: what the trainer distils from, whichever kind of teacher produced it.

Every teacher (a local model, a top-k cache, a model served by vLLM) answers one question for a rollout: the
teacher's next-token distribution at each completion position, as a `DenseTeacher` (full logits) or a
`SparseTeacher` (top-K ids, log-probs and the log-mass of the rest). The losses and the fused kernel read these.
"""

from rlkd_onpolicy.teacher.signal import DenseTeacher, SparseTeacher, Teacher, TeacherSignal

__all__ = ["DenseTeacher", "SparseTeacher", "Teacher", "TeacherSignal"]
