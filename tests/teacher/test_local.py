"""`LocalTeacher.score` counts positions over real tokens: a left-padded row scores as it does alone, unpadded (as
generation, evaluation, the cache writer and a served teacher see it)."""

import torch
from tiny_models import left_padded_rollouts, tiny_gpt2

from rlkd_onpolicy.teacher import LocalTeacher


def test_left_padding_does_not_move_a_rows_scores():
    model = tiny_gpt2(32, position_scale=50.0)
    batch, alone = left_padded_rollouts(pads=3)
    # The model can tell: shifting the row's positions by its pads moves its logits by far more than the tolerance.
    inputs = alone.model_inputs()
    shifted = model(**{**inputs, "position_ids": inputs["position_ids"] + 3}).logits
    assert (shifted - model(**inputs).logits).abs().max() > 0.1

    teacher = LocalTeacher(model, vocab_size=32)
    torch.testing.assert_close(teacher.score(batch).logits[1], teacher.score(alone).logits[0], rtol=1e-5, atol=1e-5)
