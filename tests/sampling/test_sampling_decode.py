"""The batched KV-cache decoder against its plain reference (one row at a time, full forward passes, no cache)."""

import pytest
import torch
from sampling_models import VOCAB, ragged_prompts, row_alone, tiny_llama

from rlkd_onpolicy.sampling import decode, draw_row_seeds, reference_generate
from rlkd_onpolicy.sampling.rng import STREAM_STUDENT

EOS = [3, 4, 5, 6, 7, 8]
LENGTHS = [5, 2, 7, 1, 4, 6]
NEW = 20


@pytest.fixture(scope="module")
def model():
    return tiny_llama(1)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0),  # plain sampling
        dict(temperature=0.7, top_p=0.9),  # warped sampling
        dict(temperature=0.0),  # greedy
        dict(temperature=1.0, cache_implementation="static"),  # preallocated fixed-shape cache
        dict(temperature=1.0, check_every=1),  # the all-finished check every step stops at the same tokens
    ],
)
def test_decode_matches_reference_and_rows_alone(model, options):
    ids, mask = ragged_prompts(LENGTHS, seed=1)
    seeds = draw_row_seeds(len(LENGTHS), torch.Generator().manual_seed(0))
    eos = EOS if options["temperature"] > 0 else None
    out = decode(model, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=eos, **options)
    ref_options = {k: v for k, v in options.items() if k in ("temperature", "top_p")}
    ref = reference_generate(
        model, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=eos, **ref_options
    )
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.completion_mask, ref.completion_mask)
    if eos is not None:
        lengths = out.completion_mask.sum(1)
        assert bool((lengths < NEW).any()) and bool((lengths == NEW).any()), "want early EOS and full rows"
        # after the first EOS: masked out and pad
        assert bool((out.tokens[~out.completion_mask] == 0).all())
    for i in range(len(LENGTHS)):
        alone = decode(
            model,
            *row_alone(ids, mask, i),
            seeds[i : i + 1],
            stream=STREAM_STUDENT,
            max_new_tokens=NEW,
            eos_token_id=eos,
            **options,
        )
        assert torch.equal(alone.tokens[0], out.tokens[i])


def test_greedy_decode_matches_hf_generate(model):
    ids, mask = ragged_prompts(LENGTHS, seed=2)
    seeds = draw_row_seeds(len(LENGTHS))
    out = decode(model, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=NEW, temperature=0.0)
    hf = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(out.tokens, hf[:, ids.shape[1] :])


def test_decode_stops_early_when_every_row_is_done(model):
    ids, mask = ragged_prompts(LENGTHS, seed=1)
    # every token is an EOS: each row ends after one token, and the loop stops at the first check
    out = decode(
        model,
        ids,
        mask,
        draw_row_seeds(len(LENGTHS)),
        stream=STREAM_STUDENT,
        max_new_tokens=NEW,
        eos_token_id=list(range(VOCAB)),
        check_every=2,
    )
    assert out.forward_passes == 2  # the prefill and one single-token step
    assert out.completion_mask.sum(1).tolist() == [1] * len(LENGTHS)


@pytest.mark.gpu
def test_compiled_static_step_matches_eager_on_cuda():
    """The CUDA-graph path (static cache + torch.compile) gives the eager tokens, for decode and for SKD."""
    from rlkd_onpolicy.sampling import speculative_generate

    student, teacher = tiny_llama(1).cuda(), tiny_llama(2, hidden=64).cuda()
    ids, mask = (t.cuda() for t in ragged_prompts(LENGTHS, seed=1))
    seeds = draw_row_seeds(len(LENGTHS), torch.Generator().manual_seed(0)).cuda()
    eager = decode(student, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=EOS)
    for _ in range(2):  # the second call replays the captured graphs
        compiled = decode(
            student,
            ids,
            mask,
            seeds,
            stream=STREAM_STUDENT,
            max_new_tokens=NEW,
            eos_token_id=EOS,
            cache_implementation="static",
            compile_step=True,
        )
        assert torch.equal(compiled.tokens, eager.tokens)
    options = dict(top_k=VOCAB // 2, max_new_tokens=NEW, eos_token_id=EOS, row_seeds=seeds)
    eager = speculative_generate(student, teacher, ids, mask, **options)
    compiled = speculative_generate(
        student, teacher, ids, mask, cache_implementation="static", compile_step=True, **options
    )
    assert torch.equal(compiled.sequences, eager.sequences)
