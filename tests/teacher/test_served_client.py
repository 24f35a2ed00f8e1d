"""The served teacher's refusals that need no server: arguments, the rollout layout it sends, and a closed port."""

import time

import pytest
import torch
from tiny_models import tiny_tokenizer

from rlkd_onpolicy.sampling.rollout import Rollout
from rlkd_onpolicy.teacher import ServedTeacher, ServerOptions, TeacherServerError
from rlkd_onpolicy.teacher.served import rollout_spans
from rlkd_onpolicy.teacher.vllm_server import free_port


def test_temperature_other_than_one_is_refused():
    with pytest.raises(ValueError, match=r"temperature=2.0 cannot be served exactly.*normaliser over the whole"):
        ServedTeacher("http://127.0.0.1:1", tokenizer=tiny_tokenizer(), top_k=8, temperature=2.0)


@pytest.mark.parametrize(
    "url,top_k,match",
    [
        ("127.0.0.1:8000", 8, r"url='127.0.0.1:8000' must look like 'http://host:port'"),  # no scheme
        ("http://127.0.0.1:8000", 0, r"top_k=0 must be an int >= 1"),
        ("http://127.0.0.1:8000", 8.0, r"top_k=8.0 must be an int >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_request(url, top_k, match):
    with pytest.raises(ValueError, match=match):
        ServedTeacher(url, tokenizer=tiny_tokenizer(), top_k=top_k)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(timeout=0), r"timeout=0 must be > 0"),
        (dict(retries=-1), r"retries=-1 must be an int >= 0"),
        (dict(backoff=5.0, max_backoff=1.0), r"backoff=5.0 and max_backoff=1.0"),
        (dict(rows_per_request=0), r"rows_per_request=0 must be an int >= 1"),
    ],
)
def test_bad_server_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerOptions(**kwargs)


def test_backoff_doubles_up_to_its_cap():
    options = ServerOptions(backoff=0.5, max_backoff=3.0)
    assert [options.delay(r) for r in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_closed_port_fails_after_bounded_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(TeacherServerError, match=rf"{url}/v1/models did not answer \(listing its models\) after 3 "
                       r"attempt\(s\).*ConnectionRefusedError"):  # fmt: skip
        ServedTeacher(url, tokenizer=tiny_tokenizer(), top_k=8, options=ServerOptions(retries=2, backoff=0.1))
    assert time.perf_counter() - started >= 0.1 + 0.2  # it waited between attempts


def _rollout(attention_prompt, completion):
    """One-row rollout: prompt attention mask and completion mask as lists (tokens are arbitrary)."""
    p, c = len(attention_prompt), len(completion)
    return Rollout(
        sequences=torch.arange(p + c).unsqueeze(0),
        attention_mask=torch.tensor([attention_prompt + [int(x) for x in completion]]),
        completion_mask=torch.tensor([[False] * p + completion]),
        token_source=torch.zeros(1, p + c, dtype=torch.int8),
        prompt_length=p,
    )


def test_rollout_spans_strip_left_padding():
    (span,) = rollout_spans(_rollout([0, 0, 1, 1], [True, True, True, False]))
    assert (span.start, span.prompt, span.end) == (2, 4, 7)
    assert rollout_spans(_rollout([0, 1], [False, False])) == []  # no counted token: nothing to ask


@pytest.mark.parametrize(
    "prompt,completion,match",
    [
        ([1, 0, 1], [True], r"Row 0's prompt is not left-padded"),  # a hole inside the prompt
        ([0, 0, 0], [True], r"Row 0 of the rollout has completion tokens but no prompt token"),
        ([1, 1], [True, False, True], r"Row 0's counted completion tokens are not one run"),
    ],
)
def test_rollout_layouts_the_server_cannot_score_are_refused(prompt, completion, match):
    with pytest.raises(ValueError, match=match):
        rollout_spans(_rollout(prompt, completion))
