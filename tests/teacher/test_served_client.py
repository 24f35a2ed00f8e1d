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


SERVER = "http://127.0.0.1:1"  # never contacted: every refusal below comes before any request


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), r"teacher_top_k=None is invalid: a teacher_server returns the teacher's top-K"),
        (dict(teacher_server="teacher:8000"), r"teacher_server='teacher:8000' is invalid: .*'http://host:port'"),
        # two teachers, named both
        (dict(teacher_cache="cache/", sampling_mode="off_policy"),
         r"teacher_server='http://127.0.0.1:1' is invalid: it and teacher_cache='cache/' are two teachers"),
        (dict(loss_temperature=2.0),
         r"loss_temperature=2.0 is invalid: a teacher_server gives log-probs at temperature 1"),
        (dict(teacher_offload_to_cpu=True), r"teacher_offload_to_cpu=True is invalid: .*local teacher model"),
        # SKD: the warped nucleus is not in the top-K; the round's top-K is the loss signal at the drafts
        (dict(sampling_mode="speculative", skd_verify_on="warped"), r"skd_verify_on='warped' is invalid"),
        (dict(sampling_mode="speculative", skd_top_k=30), r"skd_top_k=30 is invalid: .*≤ teacher_top_k=20"),
        # the ServerOptions checks, named by their RLKDConfig field
        (dict(teacher_server_timeout=0), r"RLKDConfig.teacher_server_timeout=0 must be > 0"),
        (dict(teacher_server_retries=-1), r"RLKDConfig.teacher_server_retries=-1 must be an int >= 0"),
        (dict(teacher_server_max_concurrency=0), r"RLKDConfig.teacher_server_max_concurrency=0 must be an int >= 1"),
    ],
)  # fmt: skip
def test_config_refuses_what_a_served_teacher_cannot_do(tmp_path, kwargs, match):
    from rlkd_onpolicy.trainer import RLKDConfig

    kwargs = {"teacher_server": SERVER, "teacher_top_k": None if not kwargs else 20, **kwargs}
    with pytest.raises(ValueError, match=match):
        RLKDConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_config_builds_the_server_options(tmp_path):
    from rlkd_onpolicy.trainer import RLKDConfig

    args = RLKDConfig(output_dir=str(tmp_path), report_to="none", teacher_server=SERVER, teacher_top_k=20,
                      teacher_server_retries=1, teacher_server_rows_per_request=2)  # fmt: skip
    assert args.teacher_server_options() == ServerOptions(retries=1, rows_per_request=2)


def test_trainer_refuses_a_teacher_model_beside_a_server(tmp_path):
    from tiny_models import tiny_llama, tiny_pairs

    from rlkd_onpolicy.trainer import RLKDConfig, RLKDTrainer

    args = RLKDConfig(output_dir=str(tmp_path), report_to="none", teacher_server=SERVER, teacher_top_k=8, rank_k=3)
    with pytest.raises(ValueError, match=r"teacher_model and args.teacher_server='http://127.0.0.1:1' are two"):
        RLKDTrainer(model=tiny_llama(64), teacher_model=tiny_llama(64), args=args, train_dataset=tiny_pairs(4),
                    processing_class=tiny_tokenizer())  # fmt: skip
