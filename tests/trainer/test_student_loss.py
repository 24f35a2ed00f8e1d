"""`StudentLoss.forward` counts positions over real tokens: a left-padded row trains at the positions it is
generated and evaluated at, whatever padding its batch neighbours force on it."""

import pytest
import torch
from tiny_models import left_padded_rollouts, tiny_gpt2

from rlkd_onpolicy import RLKDConfig
from rlkd_onpolicy.trainer.student_loss import StudentLoss


# logits: the student's (B, C, V) logits; fused: its final hidden states (B, C, H), which the fused loss reads
@pytest.mark.parametrize("backend", ["logits", "fused"])
def test_left_padding_does_not_move_a_rows_outputs(tmp_path, backend):
    model = tiny_gpt2(32, position_scale=50.0)
    batch, alone = left_padded_rollouts(pads=3)
    step = StudentLoss(RLKDConfig(output_dir=str(tmp_path), report_to="none"), backend, vocab_size=32)
    with torch.no_grad():
        padded, single = step.forward(model, model, batch), step.forward(model, model, alone)
    field = "logits" if backend == "logits" else "hidden"
    torch.testing.assert_close(getattr(padded, field)[1], getattr(single, field)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(padded.mask[1], single.mask[0])
