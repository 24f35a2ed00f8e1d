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
        # static buffers + the graph's step function (on a CPU it runs uncaptured: the bookkeeping is checked here)
        dict(temperature=1.0, cache_implementation="cuda_graph"),
        # ... and the whole step (sampling and bookkeeping too) as one graph
        dict(temperature=0.7, top_p=0.9, cache_implementation="cuda_graph", graph_sampling=True),
        dict(temperature=0.0, cache_implementation="cuda_graph", graph_sampling=True),
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


def test_graph_buckets_are_reused_across_prompt_widths_and_models(model):
    """Successive rollouts of different prompt widths share one bucket (cache zeroed in place) and still match the
    plain decoder; eager attention (additive mask) works like sdpa (boolean mask)."""
    from rlkd_onpolicy.sampling.graphs import _POOLS, release_graphs

    eager_model = tiny_llama(1)
    eager_model.config._attn_implementation = "eager"
    for m in (model, eager_model):
        release_graphs(m)
        for lengths, seed in (([5, 2, 7, 1], 1), ([3, 9, 2, 2], 2), ([1, 1, 4, 2], 3)):
            ids, mask = ragged_prompts(lengths, seed=seed)
            seeds = draw_row_seeds(len(lengths), torch.Generator().manual_seed(seed))
            options = dict(stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=EOS)
            plain = decode(m, ids, mask, seeds, **options)
            for whole_step in (False, True):
                graphed = decode(m, ids, mask, seeds, cache_implementation="cuda_graph", graph_sampling=whole_step,
                                 **options)  # fmt: skip
                assert torch.equal(graphed.tokens, plain.tokens)
                assert torch.equal(graphed.completion_mask, plain.completion_mask)
        # prompt widths 7, 9, 4 + 20 new tokens all round up to a 64-column cache: one bucket
        assert len(_POOLS[m].buckets) == 1
        release_graphs(m)
        assert m not in _POOLS


def test_graph_step_has_no_host_sync(model):
    """The captured step must not read a device value on the host (a CUDA graph cannot capture that): traced
    with torch.compile(fullgraph=True), any such read is a graph break and raises."""
    from rlkd_onpolicy.sampling.graphs import GraphBucket

    ids, mask = ragged_prompts([5, 2, 7], seed=1)
    bucket = GraphBucket(model, 3, 64, 1, torch.device("cpu"), capture=False)
    bucket.reset(mask)
    with torch.no_grad():
        prefill = {"input_ids": ids, "attention_mask": bucket.mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}
        model(**prefill, use_cache=True, **{bucket.cache_kwarg: bucket.cache})
        bucket.mask[:, 7] = 1
        bucket.ids.fill_(5)
        bucket.pos.copy_(mask.sum(-1, keepdim=True))
        expected = bucket._forward(model)
        for layer in bucket.cache.layers:  # rewind the write positions: the traced call redoes the same step
            layer.cumulative_length.sub_(1)
        bucket.column.sub_(1)
        torch._dynamo.reset()
        traced = torch.compile(bucket._forward, fullgraph=True, backend="eager")(model)
    torch.testing.assert_close(traced, expected)


def test_cuda_graph_needs_a_graphable_model():
    from rlkd_onpolicy.sampling.graphs import check_graphable

    m = tiny_llama(1)
    m.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        check_graphable(m)
    m.config._attn_implementation = "sdpa"
    m.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="full-attention"):
        check_graphable(m)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_static_on_cuda():
    """Captured and replayed on a GPU: the same tokens as the eager static-cache decoder, on first use (capture)
    and on later rollouts (replay) of the same bucket with other prompt widths."""
    from rlkd_onpolicy.sampling.graphs import _POOLS

    model = tiny_llama(1).cuda()
    for lengths, seed in (([5, 2, 7, 1, 4, 6], 1), ([3, 9, 2, 2, 1, 8], 2), ([5, 2, 7, 1, 4, 6], 3)):
        ids, mask = (t.cuda() for t in ragged_prompts(lengths, seed=seed))
        seeds = draw_row_seeds(len(lengths), torch.Generator().manual_seed(seed)).cuda()
        options = dict(stream=STREAM_STUDENT, max_new_tokens=NEW, eos_token_id=EOS)
        static = decode(model, ids, mask, seeds, cache_implementation="static", **options)
        for whole_step in (False, True):
            graphed = decode(model, ids, mask, seeds, cache_implementation="cuda_graph", graph_sampling=whole_step,
                             **options)  # fmt: skip
            assert torch.equal(graphed.tokens, static.tokens)
            assert torch.equal(graphed.completion_mask, static.completion_mask)
    assert all(b.graph is not None for b in _POOLS[model].buckets.values())
    assert all(s.graph is not None for b in _POOLS[model].buckets.values() for s in b.sampled_steps.values())


@pytest.mark.gpu
def test_cuda_graph_speculative_matches_static_on_cuda():
    """SKD with captured student (1-token) and teacher (D-token) steps: the static-cache tokens, capture and replay."""
    from rlkd_onpolicy.sampling import speculative_generate

    student, teacher = tiny_llama(1).cuda(), tiny_llama(2, hidden=64).cuda()
    for lengths, seed in (([5, 2, 7, 1, 4, 6], 1), ([3, 9, 2, 2, 1, 8], 2)):
        ids, mask = (t.cuda() for t in ragged_prompts(lengths, seed=seed))
        seeds = draw_row_seeds(len(lengths), torch.Generator().manual_seed(seed)).cuda()
        options = dict(top_k=VOCAB // 2, max_new_tokens=NEW, eos_token_id=EOS, row_seeds=seeds)
        static = speculative_generate(student, teacher, ids, mask, cache_implementation="static", **options)
        graphed = speculative_generate(student, teacher, ids, mask, cache_implementation="cuda_graph", **options)
        assert torch.equal(graphed.sequences, static.sequences)
        assert torch.equal(graphed.token_source, static.token_source)
        assert 0.2 < graphed.stats["acceptance_rate"] < 0.8


def test_whole_graph_step_has_no_host_sync(model):
    """Sampling + bookkeeping + forward (graphs.SampledStep) traced with torch.compile(fullgraph=True): any read of
    a device value on the host would be a graph break and raise, and a CUDA graph could not capture it."""
    from rlkd_onpolicy.sampling.graphs import _POOLS, release_graphs

    release_graphs(model)
    ids, mask = ragged_prompts([5, 2, 7], seed=1)
    seeds = draw_row_seeds(3, torch.Generator().manual_seed(0))
    decode(model, ids, mask, seeds, stream=STREAM_STUDENT, max_new_tokens=4, temperature=0.8, top_p=0.9,
           eos_token_id=EOS, cache_implementation="cuda_graph", graph_sampling=True)  # fmt: skip
    (sampled,) = next(iter(_POOLS[model].buckets.values())).sampled_steps.values()
    before = int(sampled.step_index)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(sampled._run, fullgraph=True, backend="eager")(model)
    assert int(sampled.step_index) == before + 1
    release_graphs(model)


def test_graph_sampling_without_cuda_graph_fails_before_any_forward(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    ids, mask = ragged_prompts([3, 2], seed=1)
    with pytest.raises(ValueError, match="graph_sampling=True needs cache_implementation='cuda_graph'"):
        decode(model, ids, mask, draw_row_seeds(2), stream=STREAM_STUDENT, max_new_tokens=4, graph_sampling=True)
    handle.remove()
    assert calls == []
