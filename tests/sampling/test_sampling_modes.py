"""RolloutSampler: every mode yields a valid Rollout; mixed mode's per-sequence lambda; reproducibility; errors."""

import pytest
import torch
from sampling_models import VOCAB, ragged_prompts, row_alone, tiny_llama

from rlkd_onpolicy.sampling import (
    SAMPLING_MODES,
    SOURCE_DATA,
    SOURCE_NONE,
    SOURCE_STUDENT,
    SOURCE_TEACHER,
    Rollout,
    RolloutSampler,
)

EOS = [3, 4, 5, 6, 7, 8]
PAD = 0
LENGTHS = [5, 2, 7, 1, 4, 6]
NEW = 12
ALLOWED_SOURCES = {
    "off_policy": {SOURCE_DATA},
    "seq_kd": {SOURCE_TEACHER},
    "on_policy": {SOURCE_STUDENT},
    "mixed": {SOURCE_DATA, SOURCE_STUDENT},
    "speculative": {SOURCE_STUDENT, SOURCE_TEACHER},
}


@pytest.fixture(scope="module")
def models():
    return tiny_llama(1), tiny_llama(2, hidden=64)


def _data(n_rows: int, seed: int = 0):
    """Right-padded dataset completions (B, 9) of ragged lengths 1..9, without EOS ids; the padded slots hold
    stray tokens (not pad) so that the Rollout must blank them itself."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n_rows,), generator=gen)
    ids = torch.randint(10, VOCAB, (n_rows, 9), generator=gen)
    return ids, (torch.arange(9) < lengths[:, None]).long()


def _sampler(mode, models, **kwargs):
    student, teacher = models
    return RolloutSampler(
        mode, student, teacher, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD, skd_top_k=VOCAB // 2, **kwargs
    )


def assert_valid_rollout(r: Rollout, prompt_ids, prompt_mask, mode: str, data_ids=None, data_mask=None):
    bsz, width = prompt_ids.shape
    assert r.prompt_length == width and r.mode == mode
    assert r.sequences.dtype == torch.long and r.attention_mask.dtype == torch.long
    assert r.completion_mask.dtype == torch.bool and r.token_source.dtype == torch.int8
    assert r.sequences.shape == r.attention_mask.shape == r.completion_mask.shape == r.token_source.shape
    assert r.sequences.shape[0] == bsz
    assert torch.equal(r.sequences[:, :width], prompt_ids) and torch.equal(r.attention_mask[:, :width], prompt_mask)
    completion = r.completion_mask[:, width:]
    assert not bool(r.completion_mask[:, :width].any())
    assert torch.equal(r.attention_mask[:, width:], completion.long())
    # completions are contiguous from column P (right-padded), every row has at least one token here
    assert bool((completion[:, 1:] <= completion[:, :-1]).all()) and bool(completion[:, 0].all())
    assert bool((r.sequences[:, width:][~completion] == PAD).all())
    source = r.token_source[:, width:]
    assert bool((r.token_source[:, :width] == SOURCE_NONE).all()) and bool((source[~completion] == SOURCE_NONE).all())
    assert set(source[completion].unique().tolist()) <= ALLOWED_SOURCES[mode]
    generated = completion & (source != SOURCE_DATA)
    tokens = r.sequences[:, width:]
    is_eos = torch.isin(tokens, torch.tensor(EOS)) & completion
    # a generated completion ends at its first EOS or at max_new_tokens; no EOS before its last token
    lengths = completion.sum(1)
    last = tokens.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
    gen_rows = generated.any(1)
    assert bool((is_eos.sum(1)[gen_rows] <= 1).all())
    assert bool(((lengths == NEW) | torch.isin(last, torch.tensor(EOS)))[gen_rows].all())
    if data_ids is not None:
        data_rows = ~gen_rows
        n = data_ids.shape[1]
        assert torch.equal(completion[data_rows, :n].long(), data_mask[data_rows])
        assert torch.equal(tokens[data_rows, :n], torch.where(data_mask.bool(), data_ids, PAD)[data_rows])
    assert r.stats["seconds"] >= 0 and r.stats["generated_tokens"] == float(generated.sum())


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_every_mode_gives_a_valid_rollout(models, mode):
    prompt_ids, prompt_mask = ragged_prompts(LENGTHS)
    data_ids, data_mask = _data(len(LENGTHS))
    sampler = _sampler(mode, models, lmbda=0.5)
    r = sampler.rollout(prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(0))
    assert_valid_rollout(r, prompt_ids, prompt_mask, mode, data_ids, data_mask)
    if mode != "off_policy":
        assert bool((r.completion_mask.sum(1) < NEW).any()), "want an early EOS"
    if mode == "speculative":
        assert {"acceptance_rate", "tokens_replaced", "teacher_forward_passes"} <= set(r.stats)


def test_off_policy_and_on_policy_need_no_teacher(models):
    student, _ = models
    prompt_ids, prompt_mask = ragged_prompts(LENGTHS)
    data_ids, data_mask = _data(len(LENGTHS))
    for mode in ("off_policy", "on_policy", "mixed"):
        r = RolloutSampler(mode, student, None, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD).rollout(
            prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(1)
        )
        assert_valid_rollout(r, prompt_ids, prompt_mask, mode, data_ids, data_mask)


@pytest.mark.parametrize("mode", ["on_policy", "mixed", "speculative", "seq_kd"])
def test_rollouts_are_reproducible_and_rows_do_not_depend_on_the_batch(models, mode):
    prompt_ids, prompt_mask = ragged_prompts(LENGTHS, seed=4)
    data_ids, data_mask = _data(len(LENGTHS))
    sampler = _sampler(mode, models, lmbda=0.5, temperature=0.9)
    a = sampler.rollout(prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(3))
    b = sampler.rollout(prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.token_source, b.token_source)
    c = sampler.rollout(prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a.sequences, c.sequences)
    if mode == "mixed":
        return
    for i in range(len(LENGTHS)):  # the same prompt alone, with its row seed
        alone = sampler.rollout(*row_alone(prompt_ids, prompt_mask, i), row_seeds=a.row_seeds[i : i + 1])
        n = alone.completion_ids.shape[1]
        assert torch.equal(alone.completion_ids[0], a.completion_ids[i, :n])


def test_mixed_draws_lambda_per_sequence(models):
    student, _ = models
    lmbda, bsz = 0.3, 400
    prompt_ids, prompt_mask = ragged_prompts([3, 1, 2, 4] * (bsz // 4), seed=5)
    data_ids, data_mask = _data(bsz, seed=6)
    sampler = RolloutSampler("mixed", student, None, lmbda=lmbda, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
    r = sampler.rollout(prompt_ids, prompt_mask, data_ids, data_mask, generator=torch.Generator().manual_seed(7))
    on_policy = (r.token_source == SOURCE_STUDENT).any(1)
    share = on_policy.float().mean().item()
    assert share == pytest.approx(r.stats["on_policy_fraction"])
    assert abs(share - lmbda) <= 3 * (lmbda * (1 - lmbda) / bsz) ** 0.5
    # the draw uses the generator: the coins are the first B uniforms it hands out
    coins = torch.rand(bsz, generator=torch.Generator().manual_seed(7)) < lmbda
    assert torch.equal(on_policy, coins)
    # on-policy rows are exactly what on_policy mode gives those rows with the same row seeds
    full = RolloutSampler("on_policy", student, None, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD).rollout(
        prompt_ids, prompt_mask, row_seeds=r.row_seeds
    )
    width = full.sequences.shape[1]
    assert torch.equal(r.sequences[on_policy, :width], full.sequences[on_policy])
    # lambda 0 and 1 are the two pure modes
    for lmbda, expected in ((0.0, False), (1.0, True)):
        sampler.lmbda = lmbda
        r = sampler.rollout(prompt_ids[:8], prompt_mask[:8], data_ids[:8], data_mask[:8])
        assert bool(((r.token_source == SOURCE_STUDENT).any(1) == expected).all())


def test_models_keep_their_training_mode(models):
    student, teacher = models
    student.train()
    try:
        r = _sampler("speculative", models).rollout(*ragged_prompts(LENGTHS), generator=torch.Generator())
        assert student.training and not teacher.training and not r.sequences.requires_grad
    finally:
        student.eval()


@pytest.mark.parametrize(
    "mode, kwargs, message",
    [
        ("reinforce", {}, "unknown sampling mode"),
        ("mixed", dict(lmbda=1.5), "lmbda"),
        ("mixed", dict(lmbda=-0.1), "lmbda"),
        ("on_policy", dict(max_new_tokens=0), "max_new_tokens"),
        ("speculative", dict(skd_top_k=0), "top_k"),
        ("speculative", dict(skd_top_k=VOCAB + 1), "top_k"),
        ("speculative", dict(skd_draft_len=0), "draft_len"),
        ("speculative", dict(verify_on="both"), "verify_on"),
        ("on_policy", dict(top_p=1.5), "top_p"),
        ("on_policy", dict(cache_implementation="paged"), "cache_implementation"),
        ("on_policy", dict(graph_sampling=True), "graph_sampling=True needs cache_implementation"),
    ],
)
def test_bad_configuration_raises(models, mode, kwargs, message):
    student, teacher = models
    with pytest.raises(ValueError, match=message):
        RolloutSampler(mode, student, teacher, **kwargs)


def test_bad_models_and_batches_raise(models):
    student, teacher = models
    with pytest.raises(ValueError, match="needs a teacher"):
        RolloutSampler("speculative", student, None)
    with pytest.raises(ValueError, match="output layers differ"):
        RolloutSampler("seq_kd", student, tiny_llama(3, vocab=4 * VOCAB))
    prompt_ids, prompt_mask = ragged_prompts(LENGTHS)
    data_ids, data_mask = _data(len(LENGTHS))
    sampler = RolloutSampler("mixed", student, None)
    with pytest.raises(ValueError, match="LEFT-padded"):
        sampler.rollout(prompt_ids.flip(1), prompt_mask.flip(1), data_ids, data_mask)
    with pytest.raises(ValueError, match="completion_ids"):
        sampler.rollout(prompt_ids, prompt_mask)
    with pytest.raises(ValueError, match="RIGHT-padded"):
        sampler.rollout(prompt_ids, prompt_mask, data_ids.flip(1), data_mask.flip(1))
    with pytest.raises(ValueError, match="B = 6"):
        sampler.rollout(prompt_ids, prompt_mask, data_ids[:3], data_mask[:3])
