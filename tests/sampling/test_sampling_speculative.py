"""Speculative KD: the per-position law, the batched ragged-acceptance decoder against its plain reference, and
the limiting cases (top_k = 1 with a greedy teacher is the teacher's greedy decoding; top_k = V is on-policy)."""

import pytest
import torch
from sampling_models import VOCAB, ragged_prompts, row_alone, tiny_llama
from scipy import stats

from rlkd_onpolicy.sampling import (
    SOURCE_NONE,
    SOURCE_STUDENT,
    SOURCE_TEACHER,
    decode,
    draw_row_seeds,
    reference_generate,
    reference_speculative_generate,
    row_uniforms,
    sample_from_logits,
    speculative_generate,
    verify_drafts,
    warp_probs,
)
from rlkd_onpolicy.sampling.rng import STREAM_STUDENT, STREAM_TEACHER

EOS = [3, 4, 5, 6, 7, 8]  # several EOS ids so that sampled rows end early at different steps
LENGTHS = [5, 2, 7, 1, 4, 6]  # ragged prompts, one of a single token (no prefill)
NEW = 16


@pytest.fixture(scope="module")
def models():
    return tiny_llama(1), tiny_llama(2, hidden=64)


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(LENGTHS)


def _seeds(n: int, seed: int = 0) -> torch.Tensor:
    return draw_row_seeds(n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ the law
@pytest.mark.parametrize(
    "verify_on, temperature, top_p, teacher_temperature, teacher_top_p, top_k",
    [
        ("raw", 1.0, 1.0, 1.0, 1.0, 3),  # the paper's untempered setting
        ("raw", 0.8, 0.9, 0.5, 0.8, 4),  # warped proposals and replacements, top-K test on raw teacher logits
        ("warped", 1.0, 1.0, 0.5, 0.6, 4),  # released-code setting: nucleus smaller than K, accept set = nucleus
        ("warped", 1.0, 1.0, 0.5, 1.0, 3),  # warped by temperature alone: the order of the raw logits
    ],
)
def test_emitted_tokens_follow_the_skd_law(verify_on, temperature, top_p, teacher_temperature, teacher_top_p, top_k):
    """P(emit = t) = q(t)·1[t in A] + (1 - q(A))·p'(t), checked on the code path the decoder runs
    (sample_from_logits for the proposal, verify_drafts for accept / replace), over 150k independent rows."""
    n, vocab = 150_000, 8
    student_logits = torch.tensor([1.0, 0.5, 2.0, -0.5, 0.0, 1.5, -1.0, 0.3])
    teacher_logits = torch.tensor([0.2, 2.5, 1.8, 1.0, -0.7, 0.4, 2.2, -1.5])
    seeds = _seeds(n, 3)
    proposal = sample_from_logits(
        student_logits.expand(n, vocab), row_uniforms(seeds, 0, STREAM_STUDENT), temperature, top_p
    )
    n_accept, replacement = verify_drafts(
        proposal[:, None],
        teacher_logits.expand(n, 1, vocab),
        seeds,
        torch.zeros(n, dtype=torch.long),
        top_k=top_k,
        teacher_temperature=teacher_temperature,
        teacher_top_p=teacher_top_p,
        verify_on=verify_on,
    )
    emitted = torch.where(n_accept == 1, proposal, replacement)

    # the law, from its definition: an explicit accept set from a sort, not the decoder's threshold test
    q = warp_probs(student_logits, temperature, top_p).double()
    p_teacher = warp_probs(teacher_logits, teacher_temperature, teacher_top_p).double()
    scores = p_teacher if verify_on == "warped" else teacher_logits.double()
    accept = torch.zeros(vocab, dtype=torch.bool)
    accept[scores.argsort(descending=True)[:top_k]] = True
    if verify_on == "warped":
        accept &= p_teacher > 0
    law = q * accept + (1 - q[accept].sum()) * p_teacher
    counts = torch.bincount(emitted, minlength=vocab).double()
    assert counts[law == 0].sum() == 0
    support = law > 0
    assert stats.chisquare(counts[support].numpy(), (law[support] / law[support].sum() * n).numpy()).pvalue > 1e-3
    # the acceptance rate is q(A)
    assert abs((n_accept == 1).double().mean() - q[accept].sum()) < 4 * (0.25 / n) ** 0.5


def test_verify_drafts_accepts_the_leading_run_and_replaces_the_first_failure():
    # teacher top-2 at every position is {1, 2}; drafts fail at positions 2, 0, never, and 1
    teacher_logits = torch.tensor([0.0, 5.0, 4.0, -1.0, -2.0]).expand(4, 3, 5)
    drafts = torch.tensor([[1, 2, 3], [4, 1, 2], [2, 1, 1], [1, 0, 1]])
    n_accept, replacement = verify_drafts(
        drafts, teacher_logits, _seeds(4), torch.zeros(4, dtype=torch.long), top_k=2, teacher_temperature=0.0
    )
    assert n_accept.tolist() == [2, 0, 3, 1]
    assert replacement[[0, 1, 3]].tolist() == [1, 1, 1]  # the teacher's argmax


# ----------------------------------------------------------------------------------- the batched ragged decoder
@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=VOCAB // 2),  # about half the proposals rejected: ragged acceptance in every round
        dict(
            top_k=5,
            draft_len=3,
            temperature=0.9,
            top_p=0.95,
            teacher_temperature=0.7,
            teacher_top_p=0.8,
            verify_on="warped",
        ),  # every warp in play, the released code's warped top-K test
        dict(top_k=VOCAB // 2, cache_implementation="static"),  # the preallocated fixed-shape cache
        # graph buckets (student 1-token, teacher D-token steps), uncaptured on a CPU: the bookkeeping is checked
        dict(top_k=VOCAB // 2, cache_implementation="cuda_graph"),
        dict(top_k=5, draft_len=3, verify_on="warped", teacher_temperature=0.7, cache_implementation="cuda_graph"),
    ],
)
def test_ragged_batch_matches_reference_and_rows_alone(models, prompts, options):
    student, teacher = models
    ids, mask = prompts
    seeds = _seeds(len(LENGTHS))
    rollout = speculative_generate(
        student, teacher, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=0, row_seeds=seeds, **options
    )
    ref_options = {k: v for k, v in options.items() if k not in ("draft_len", "cache_implementation")}
    ref_tokens, ref_source, ref_mask = reference_speculative_generate(
        student, teacher, ids, mask, seeds, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=0, **ref_options
    )
    width = rollout.sequences.shape[1] - ids.shape[1]
    completion = rollout.completion_ids
    assert torch.equal(completion, ref_tokens[:, :width]) and bool((ref_tokens[:, width:] == 0).all())
    assert torch.equal(rollout.completion_mask[:, ids.shape[1] :], ref_mask[:, :width])
    ref_source = torch.where(ref_mask, ref_source, SOURCE_NONE)[:, :width]
    assert torch.equal(rollout.token_source[:, ids.shape[1] :], ref_source)
    lengths = ref_mask.sum(1)
    assert bool((lengths < NEW).any()) and bool((lengths == NEW).any()), "want early EOS and full-length rows"
    if options["top_k"] == VOCAB // 2:
        assert 0.2 < rollout.stats["acceptance_rate"] < 0.8
    for i in range(len(LENGTHS)):  # batch size 1, no padding, same row seed: the same tokens
        alone = speculative_generate(
            student,
            teacher,
            *row_alone(ids, mask, i),
            max_new_tokens=NEW,
            eos_token_id=EOS,
            pad_token_id=0,
            row_seeds=seeds[i : i + 1],
            **options,
        )
        n = alone.completion_ids.shape[1]
        assert torch.equal(alone.completion_ids[0], completion[i, :n]) and bool((completion[i, n:] == 0).all())


def test_stats_count_the_work(models, prompts):
    student, teacher = models
    ids, mask = prompts
    draft_len = 4
    r = speculative_generate(
        student,
        teacher,
        ids,
        mask,
        top_k=VOCAB // 2,
        draft_len=draft_len,
        max_new_tokens=NEW,
        row_seeds=_seeds(len(LENGTHS)),
    )
    completion = r.completion_mask
    accepted = int((completion & (r.token_source == SOURCE_STUDENT)).sum())
    replaced = int((completion & (r.token_source == SOURCE_TEACHER)).sum())
    assert r.stats["generated_tokens"] == accepted + replaced == len(LENGTHS) * NEW
    assert r.stats["tokens_replaced"] == replaced
    assert r.stats["acceptance_rate"] == pytest.approx(accepted / (accepted + replaced))
    # one teacher pass per round (plus the prefill), D student passes per round
    rounds = r.stats["rounds"]
    assert r.stats["teacher_forward_passes"] == rounds + 1
    assert r.stats["student_forward_passes"] == draft_len * rounds + 1
    assert rounds >= NEW / draft_len


def test_top_k_one_with_greedy_teacher_is_teacher_greedy_decoding(models, prompts):
    student, teacher = models
    ids, mask = prompts
    seeds = _seeds(len(LENGTHS))
    greedy = reference_generate(teacher, ids, mask, seeds, stream=STREAM_TEACHER, max_new_tokens=NEW, temperature=0)
    eos = int(greedy.tokens[0, 4])  # an EOS that row 0 reaches at step 4 (or earlier), for an early stop
    greedy = reference_generate(
        teacher, ids, mask, seeds, stream=STREAM_TEACHER, max_new_tokens=NEW, temperature=0, eos_token_id=eos
    )
    assert bool((greedy.completion_mask.sum(1) < NEW).any())
    rollout = speculative_generate(
        student,
        teacher,
        ids,
        mask,
        top_k=1,
        teacher_temperature=0.0,
        max_new_tokens=NEW,
        eos_token_id=eos,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(5),
    )
    width = rollout.completion_ids.shape[1]
    assert torch.equal(rollout.completion_ids, greedy.tokens[:, :width])
    assert torch.equal(rollout.completion_mask[:, ids.shape[1] :], greedy.completion_mask[:, :width])
    # and HF's own greedy generate, one prompt at a time
    for i in range(len(LENGTHS)):
        row_ids, row_mask = row_alone(ids, mask, i)
        hf = teacher.generate(
            input_ids=row_ids,
            attention_mask=row_mask,
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=eos,
            pad_token_id=0,
        )[0, row_ids.shape[1] :]
        assert torch.equal(rollout.completion_ids[i, : hf.shape[0]], hf)


def test_top_k_vocab_accepts_everything_and_equals_on_policy(models, prompts):
    student, teacher = models
    ids, mask = prompts
    seeds = _seeds(len(LENGTHS), 7)
    rollout = speculative_generate(
        student,
        teacher,
        ids,
        mask,
        top_k=VOCAB,
        max_new_tokens=NEW,
        eos_token_id=EOS,
        pad_token_id=0,
        row_seeds=seeds,
        temperature=0.8,
    )
    assert rollout.stats["acceptance_rate"] == 1.0 and rollout.stats["tokens_replaced"] == 0
    on_policy = decode(
        student, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=EOS, temperature=0.8
    )
    width = rollout.completion_ids.shape[1]
    assert torch.equal(rollout.completion_ids, on_policy.tokens[:, :width])


def test_padding_rows_of_a_larger_teacher_vocabulary_are_never_sampled(models, prompts):
    student, _ = models
    teacher = tiny_llama(2, vocab=VOCAB + 32, hidden=64)  # same tokenizer, 32 padding rows in the output layer
    with torch.no_grad():
        teacher.lm_head.weight[VOCAB:] = 50.0  # padding rows that would win every draw if they were sampled
    ids, mask = prompts
    # the tokenizer's length tells the padding apart (issue 31: without it, rows that differ are refused)
    r = speculative_generate(student, teacher, ids, mask, top_k=3, max_new_tokens=8, generator=torch.Generator(),
                             vocab_size=VOCAB)
    assert r.stats["tokens_replaced"] > 0 and int(r.completion_ids.max()) < VOCAB
    with pytest.raises(ValueError, match="pass vocab_size=len"):
        speculative_generate(student, teacher, ids, mask, top_k=3, max_new_tokens=8)


def test_models_return_to_their_mode_and_nothing_tracks_gradients(models, prompts):
    student, teacher = models
    student.train()
    try:
        r = speculative_generate(student, teacher, *prompts, top_k=10, max_new_tokens=4, generator=torch.Generator())
        assert student.training and not teacher.training
        assert not r.sequences.requires_grad
    finally:
        student.eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k"),  # below 1
        (dict(top_k=VOCAB + 1), "top_k"),  # larger than the vocabulary
        (dict(draft_len=0), "draft_len"),
        (dict(verify_on="logits"), "verify_on"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(teacher_top_p=0.0), "teacher_top_p"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_options_raise_before_generation(models, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        speculative_generate(*models, *prompts, **kwargs)


def test_bad_inputs_raise(models, prompts):
    student, teacher = models
    ids, mask = prompts
    with pytest.raises(ValueError, match="LEFT-padded"):
        speculative_generate(student, teacher, ids.flip(1), mask.flip(1))
    with pytest.raises(ValueError, match="same shape"):
        speculative_generate(student, teacher, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="output layers differ"):
        speculative_generate(student, tiny_llama(3, vocab=4 * VOCAB), ids, mask)
