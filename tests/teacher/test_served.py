"""The served teacher against a real vLLM server (one per session, conftest.py) serving SmolLM2-135M, compared with
the same model run locally by transformers: the top-K, the losses computed from it, the checks before training,
and the retry / clear-error paths through a loopback proxy that the tests break."""

import json
import time

import pytest
import torch
from loopback_proxy import LoopbackProxy
from tiny_models import tiny_tokenizer

from rlkd_onpolicy.kernels import fused_topk_loss
from rlkd_onpolicy.losses import distillation_loss, teacher_topk
from rlkd_onpolicy.models import student_from_teacher
from rlkd_onpolicy.sampling.rollout import SOURCE_DATA, SOURCE_TEACHER, assemble_rollout
from rlkd_onpolicy.sampling.speculative import verify_drafts
from rlkd_onpolicy.teacher import ServedTeacher, ServerOptions, SparseTeacher, TeacherServerError
from rlkd_onpolicy.teacher.served import served_generate, served_speculative_round

K = 64  # the session server's --max-logprobs (conftest.py)
MAX_MODEL_LEN = 512  # and its --max-model-len
# Rows of different lengths, left-padded prompts, one row without a completion token, and more rows than one
# request carries (rows_per_request=2 below), so the batch is split into concurrent requests.
PAIRS = [
    ("Translate to French: The cat sleeps.", " Le chat dort."),
    ("Hello", " world! How are you today? I hope the weather is fine where you are."),
    ("Once upon a time, in a small village by the river, there lived", " an old fisherman who"),
    ("2 + 2 =", ""),
    ("The capital of France is", " Paris, and the capital of Italy is Rome."),
]


def make_rollout(tokenizer, pairs=PAIRS):
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in pairs]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] if c else [] for _, c in pairs]
    pad = tokenizer.pad_token_id
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [pad] * (width_c - len(c)) for c in completions], dtype=torch.int64)
    completion_mask = torch.tensor([[True] * len(c) + [False] * (width_c - len(c)) for c in completions]).bool()
    return assemble_rollout(
        prompt_ids, prompt_mask, completion_ids, completion_mask, torch.full_like(completion_ids, SOURCE_DATA),
        pad_token_id=pad, stats={}, mode="off_policy",
    )  # fmt: skip


@torch.no_grad()
def local_logits(model, rollout):
    """The local teacher as the trainer runs it: the padded batch, logits at columns P-1 … T-2 (B, C, V). Position
    ids follow the attention mask, so a left-padded row sees the positions it has alone."""
    positions = (rollout.attention_mask.cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=positions).logits
    return logits[:, rollout.prompt_length - 1 : -1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The local model's many small forwards run on one torch thread: on the 2 shared cores, beside the server's worker
    and other jobs, two threads made them 14× slower (25 one-row forwards: 72 s vs 5 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(vllm_server, smollm2):
    options = ServerOptions(rows_per_request=2, max_concurrency=3, retries=2, backoff=0.2)
    return ServedTeacher(vllm_server.url, tokenizer=smollm2[1], top_k=K, options=options)


@pytest.fixture(scope="module")
def batch(smollm2):
    """(rollout, mask (B, C), served-vs-local reference top-K of the local model)."""
    model, tokenizer, _ = smollm2
    rollout = make_rollout(tokenizer)
    mask = rollout.completion_mask[:, rollout.prompt_length :]
    return rollout, mask, teacher_topk(local_logits(model, rollout), K)


def test_check_reports_the_server(served, vllm_server, smollm2):
    assert (vllm_server.max_logprobs, vllm_server.max_model_len) == (K, MAX_MODEL_LEN)
    info = served.info
    assert info.url == vllm_server.url and info.max_model_len == MAX_MODEL_LEN
    assert info.vocab_size == len(smollm2[1]) == 49152  # found by bisection on the server's own id check
    assert info.max_logprobs_ok == K and len(info.tokenizer_hash) == 64


def test_served_topk_equals_local_topk(served, batch):
    rollout, mask, local = batch
    signal = served.score(rollout)
    assert isinstance(signal, SparseTeacher) and signal.ids.shape == local.ids.shape == mask.shape + (K,)
    assert mask.sum(1).tolist()[3] == 0 and len(set(mask.sum(1).tolist())) == len(PAIRS)  # an empty row, ragged
    assert torch.equal(signal.ids[mask], local.ids[mask])
    assert (signal.logprobs[mask] - local.logprobs[mask]).abs().max() <= 1e-4
    # The served tail is log(1 − Σ top-K); compare it as mass (where it is tiny, its log is rounding noise).
    assert (signal.tail_logprob[mask].exp() - local.tail_logprob[mask].exp()).abs().max() <= 1e-4
    assert torch.isfinite(signal.logprobs).all() and not signal.tail_logprob[mask].isnan().any()
    # Sorted by decreasing log-prob, distinct ids, as SparseTeacher promises.
    assert (signal.logprobs[mask].diff(dim=-1) <= 0).all()
    assert all(len(set(row.tolist())) == K for row in signal.ids[mask])


# The served tail is log(1 − Σ top-K) from float32 log-probs, which share one float32 normaliser: its mass is right
# to ~1e-5 (measured 1.2e-5), so log(tail) is off by up to 0.007 where the tail mass is ~3e-4. Forward KL weighs that
# error by the teacher's tiny tail mass; the losses that weigh it by the student's tail mass (rkl, jsd, and tvd, which
# reads |p_tail − q_tail|) differ by up to ~3e-4 relative here, hence their tolerance.
@pytest.mark.parametrize(
    "loss,missing_mass,rank_weight,rtol",
    [
        ("fkl", "tail", 0.0, 1e-4),  # forward KL with the tail bucket: the served loss TRL's server trainer has
        ("rkl", "tail", 0.0, 1e-3),  # the divergences TRL cuts to top-1 on a server
        ("jsd", "tail", 0.0, 1e-3),
        ("tvd", "tail", 0.0, 1e-3),
        ("skl", "renormalize", 0.0, 1e-4),  # renormalised on the K ids: no tail, so the top-K precision holds
        ("fkl", "tail", 2.0, 1e-4),  # + the RLKD ranking loss on the sparse teacher
    ],
)
def test_losses_from_served_equal_local(served, batch, smollm2, loss, missing_mass, rank_weight, rtol):
    rollout, mask, local = batch
    signal = served.score(rollout)
    student = student_from_teacher(smollm2[0], layers=2).eval()
    with torch.no_grad():
        out = student(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, output_hidden_states=True)
    p = rollout.prompt_length
    student_logits = out.logits[:, p - 1 : -1]
    options = dict(loss=loss, missing_mass=missing_mass, rank_weight=rank_weight, mask=mask)
    served_loss = distillation_loss(student_logits, **signal.loss_inputs(), **options).loss
    local_loss = distillation_loss(
        student_logits, teacher_topk_ids=local.ids, teacher_topk_logprobs=local.logprobs,
        teacher_tail_logprob=local.tail_logprob, **options,
    ).loss  # fmt: skip
    assert torch.isfinite(served_loss) and served_loss > 0
    torch.testing.assert_close(served_loss, local_loss, rtol=rtol, atol=1e-5)
    # The fused kernel (reference backend on the CPU) reads the same signal from the hidden states.
    hidden = out.hidden_states[-1][:, p - 1 : -1]
    fused = dict(loss=loss, missing_mass=missing_mass, rank_weight=rank_weight, backend="torch")
    served_fused = fused_topk_loss(hidden, student.lm_head.weight, signal.ids, signal.logprobs, mask,
                                   teacher_tail_logprob=signal.tail_logprob, **fused)  # fmt: skip
    local_fused = fused_topk_loss(hidden, student.lm_head.weight, local.ids, local.logprobs, mask,
                                  teacher_tail_logprob=local.tail_logprob, **fused)  # fmt: skip
    torch.testing.assert_close(served_fused, local_fused, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(served_fused, served_loss, rtol=1e-4, atol=1e-5)


def test_score_names_a_row_too_long_for_the_server(served, smollm2):
    tokenizer = smollm2[1]
    long = " ".join(["word"] * MAX_MODEL_LEN)
    rollout = make_rollout(tokenizer, [("Hi", " there"), ("Say", long)])
    with pytest.raises(ValueError, match=r"Row 1 has \d+ tokens.*--max-model-len 512"):
        served.score(rollout)


def test_top_k_above_max_logprobs_is_refused(vllm_server, smollm2):
    match = rf"top_k=65 exceeds the teacher server's --max-logprobs 64 \({vllm_server.url}\)"
    with pytest.raises(TeacherServerError, match=match):
        ServedTeacher(vllm_server.url, tokenizer=smollm2[1], top_k=K + 1)


def swapped_tokenizer(tokenizer, a: int, b: int):
    """The student's tokenizer with token ids a and b exchanged: same size, different id → string map."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    token_a = next(t for t, i in vocab.items() if i == a)
    token_b = next(t for t, i in vocab.items() if i == b)
    vocab[token_a], vocab[token_b] = b, a
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    swapped.name_or_path = "swapped-tokenizer"
    return swapped


def test_tokenizer_mismatch_is_refused(vllm_server, smollm2):
    tokenizer = smollm2[1]
    swapped = swapped_tokenizer(tokenizer, 5000, 30000)
    assert len(swapped) == len(tokenizer) and swapped.decode([5000]) == tokenizer.decode([30000])
    with pytest.raises(TeacherServerError, match=r"another tokenizer.*swapped-tokenizer.*token ids 4096–8191"):
        ServedTeacher(vllm_server.url, tokenizer=swapped, top_k=8)
    # A smaller tokenizer of another family: the server's extra ids could be padding (issue 31: any number of
    # padding rows is accepted), so the tokenizer check refuses it.
    with pytest.raises(TeacherServerError, match=r"another tokenizer"):
        ServedTeacher(vllm_server.url, tokenizer=tiny_tokenizer(), top_k=8)
    # A student that uses more ids than the server accepts is refused on the vocabulary size, naming both.
    with pytest.raises(TeacherServerError, match=r"accepts 49152 token ids, fewer than the student's 49252"):
        ServedTeacher(vllm_server.url, tokenizer=tokenizer, vocab_size=len(tokenizer) + 100, top_k=8)


def test_unknown_model_name_is_refused(vllm_server, smollm2):
    with pytest.raises(TeacherServerError, match=r"does not serve model='other'; it serves \['.*smollm2'\]"):
        ServedTeacher(vllm_server.url, tokenizer=smollm2[1], top_k=8, model="other")


def test_retries_recover_from_real_faults(vllm_server, smollm2, served, batch):
    """A reset, an HTTP 503 and a connection that never answers, each retried with backoff, then the same answer."""
    rollout, mask, _ = batch
    direct = served.score(rollout)
    proxy = LoopbackProxy(vllm_server.port)
    try:
        options = ServerOptions(retries=3, backoff=0.1, timeout=3.0, rows_per_request=8)
        teacher = ServedTeacher(proxy.url, tokenizer=smollm2[1], top_k=K, options=options)
        before = proxy.connections
        proxy.fail_next(1, "reset")
        proxy.fail_next(1, "503")
        proxy.fail_next(1, "hang")
        started = time.perf_counter()
        signal = teacher.score(rollout)
        assert proxy.connections - before == 4  # three failed attempts, then the one that answered
        assert time.perf_counter() - started >= 0.1 + 0.2 + 0.4 + 3.0  # the backoffs and one timeout
        assert torch.equal(signal.ids, direct.ids) and torch.equal(signal.logprobs, direct.logprobs)
        # More failures in a row than retries: a clear error naming the URL and the step, never a partial signal.
        proxy.fail_next(4, "503")
        with pytest.raises(TeacherServerError, match=rf"{proxy.url}/v1/completions did not answer at training step 7 "
                           r"after 4 attempt\(s\).*HTTP 503: no backend"):  # fmt: skip
            teacher.score(rollout, step=7)
    finally:
        proxy.close()


def test_server_gone_mid_run_is_a_clear_error(vllm_server, smollm2, batch):
    rollout = batch[0]
    proxy = LoopbackProxy(vllm_server.port)
    options = ServerOptions(retries=2, backoff=0.1)
    teacher = ServedTeacher(proxy.url, tokenizer=smollm2[1], top_k=8, options=options)
    teacher.score(rollout, step=1)
    proxy.close()  # the server is gone: connections are refused
    with pytest.raises(TeacherServerError, match=rf"{proxy.url}/v1/completions did not answer at training step 2 "
                       r"after 3 attempt\(s\).*Connection ?Refused"):  # fmt: skip
        teacher.score(rollout, step=2)


def test_speculative_round_matches_local_verification(served, smollm2):
    """Accept/replace through the server = `verify_drafts` on the local teacher's logits (greedy replacement)."""
    model, tokenizer, _ = smollm2
    prefixes = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in PAIRS]
    d, top_k = 5, 3
    drafts = []
    with torch.no_grad():
        for row, prefix in enumerate(prefixes):
            # Drafts that pass for a while and then fail: the teacher's own greedy tokens, one swapped for a
            # rare token at a row-dependent place (row 4: none, all D pass).
            tokens = list(prefix)
            for _ in range(d):
                tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
            draft = tokens[len(prefix) :]
            if row < d - 1:
                draft[row + 1] = 40000
            drafts.append(draft)
    drafts = torch.tensor(drafts)
    result = served_speculative_round(served, prefixes, drafts, top_k=top_k, teacher_temperature=0.0)
    for row, prefix in enumerate(prefixes):
        with torch.no_grad():
            logits = model(torch.tensor([prefix + drafts[row].tolist()])).logits[0, len(prefix) - 1 : -1]
        zero = torch.zeros(1, dtype=torch.int64)  # row seed and position: unused by a greedy replacement
        n_accept, replacement = verify_drafts(
            drafts[row : row + 1], logits.unsqueeze(0), zero, zero, top_k=top_k, teacher_temperature=0.0
        )
        assert int(result.n_accept[row]) == int(n_accept[0])
        if int(n_accept[0]) < d:
            assert int(result.replacement[row]) == int(replacement[0])
        else:
            assert int(result.replacement[row]) == -1
        assert torch.equal(result.topk_ids[row], teacher_topk(logits, K).ids)
    assert result.n_accept.tolist() == [1, 2, 3, 4, 5]


def test_seq_kd_generation_matches_local_greedy(served, smollm2):
    model, tokenizer, _ = smollm2
    rollout = make_rollout(tokenizer, [(p, "") for p, _ in PAIRS[:3]])
    prompt_ids, prompt_mask, width = rollout.sequences, rollout.attention_mask, rollout.prompt_length

    def local_greedy(row, eos):
        prompt = prompt_ids[row][prompt_mask[row].bool()].unsqueeze(0)
        with torch.no_grad():
            out = model.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return out[0, prompt.shape[1] :].tolist()

    # A stop id that row 0's greedy answer reaches at its 4th token, beside the model's EOS: the completion must end
    # there, that token included, exactly where the local sampler ends it.
    stop = local_greedy(0, tokenizer.eos_token_id)[3]
    eos = [tokenizer.eos_token_id, stop]
    out = served_generate(served, prompt_ids, prompt_mask, max_new_tokens=12, temperature=0.0, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert out.mode == "seq_kd" and out.stats["generated_tokens"] > 0
    assert (out.token_source[out.completion_mask] == SOURCE_TEACHER).all()
    for row in range(prompt_ids.shape[0]):
        got = out.sequences[row, width:][out.completion_mask[row, width:]]
        assert got.tolist() == local_greedy(row, eos)
    first = out.sequences[0, width:][out.completion_mask[0, width:]]
    assert first[-1] == stop and len(first) <= 4
