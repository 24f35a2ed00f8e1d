"""Speculative knowledge distillation (SKD; Xu et al. 2024, arXiv 2410.11325): the student proposes, the teacher
keeps a proposal that lies in its top-K and otherwise replaces it with a token of its own.

The law for one position, with q the student's warped distribution, p' the teacher's warped distribution and A the
accept set (the teacher's top-K of its raw or warped scores, restricted to tokens with non-zero warped probability
when verify_on="warped"):  P(emit = t) = q(t)·1[t ∈ A] + (1 − q(A))·p'(t).

Batched ragged acceptance. Both models lag one token behind the output: at the start of a round the last emitted
token `last` is in neither KV cache. A round
  1. lets the student draft d_1..d_D by feeding last, d_1, ..., d_{D-1} one at a time (D single-token passes);
  2. feeds the teacher the same block [last, d_1, ..., d_{D-1}] in ONE pass; its logits at block position j are the
     teacher's next-token logits for d_{j+1};
  3. accepts each row's leading drafts that pass the top-K test (a_i of them), replaces the first failing one by a
     teacher sample and drops the rest; no bonus token when all D pass (as in the released SKD code: a bonus token
     would be a teacher token without a student proposal, which breaks the law above);
  4. keeps every row's caches the same width: both caches hold the D block columns, and the columns after a row's
     v_i = min(a_i + 1, D) valid ones become holes (attention mask 0). Each row's position ids continue from its
     own count of real tokens, so with RoPE and the 2-D mask a row sees exactly what it would see alone.
The new `last` is the replacement (or d_D), which again is in neither cache. The teacher runs once per round.
"""

import time
from collections.abc import Sequence

import torch

from rlkd_onpolicy.vocab import output_rows, sampling_vocabulary

from .graphs import check_graphable, graph_bucket
from .hf import (
    check_prompt,
    eos_tensor,
    eval_mode,
    forward_step,
    model_device,
    new_cache,
    position_ids_from_mask,
    resolve_pad,
)
from .rng import STREAM_STUDENT, STREAM_TEACHER, resolve_row_seeds, row_uniforms
from .rollout import SOURCE_STUDENT, SOURCE_TEACHER, Rollout, assemble_rollout, first_eos_mask
from .spec import SamplingSpec
from .warping import sample_from_logits, warp_logprobs


def topk_accept(
    proposed: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    top_k: int,
    teacher_temperature: float = 1.0,
    teacher_top_p: float = 1.0,
    verify_on: str = "raw",
) -> torch.Tensor:
    """Whether each proposed token is among the teacher's top-K. proposed (...), teacher_logits (..., V) -> bool (...).

    The test is "fewer than K scores are strictly larger", i.e. score >= the K-th largest score: one compare-and-count
    pass over V instead of a top-K sort; a tie at the K-th place accepts every tied token (ties have probability
    zero with real logits). With verify_on="warped" the scores are the teacher's temperature / top-p warped
    log-probabilities and a token outside the nucleus (score -inf) is never accepted, even when the nucleus holds
    fewer than K tokens. Temperature alone does not change the order, so then the raw logits are ranked.
    """
    if verify_on == "warped" and (teacher_top_p < 1.0 or teacher_temperature == 0):
        scores = warp_logprobs(teacher_logits, teacher_temperature, teacher_top_p)
    else:
        scores = teacher_logits.float()
    chosen = scores.gather(-1, proposed.unsqueeze(-1))
    rank = (scores > chosen).sum(-1)
    return (rank < top_k) & (chosen.squeeze(-1) > float("-inf"))


def verify_drafts(
    drafts: torch.Tensor,
    teacher_logits: torch.Tensor,
    row_seeds: torch.Tensor,
    positions: torch.Tensor,
    *,
    top_k: int,
    teacher_temperature: float = 1.0,
    teacher_top_p: float = 1.0,
    verify_on: str = "raw",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept the leading drafts that pass the top-K test; sample the teacher's replacement for the first failure.

    drafts (B, D) the student's proposals; teacher_logits (B, D, V), row j being the teacher's next-token logits for
    drafts[:, j]; row_seeds (B,); positions (B,) the output position of drafts[:, 0]. The replacement at output
    position t uses `row_uniforms(seed, t, STREAM_TEACHER)`.
    Returns n_accept (B,) in [0, D] and replacement (B,) (meaningful where n_accept < D).
    """
    bsz, draft_len = drafts.shape
    ok = topk_accept(
        drafts,
        teacher_logits,
        top_k=top_k,
        teacher_temperature=teacher_temperature,
        teacher_top_p=teacher_top_p,
        verify_on=verify_on,
    )
    n_accept = ok.long().cumprod(-1).sum(-1)
    at = n_accept.clamp_max(draft_len - 1)
    rows = torch.arange(bsz, device=drafts.device)
    u = row_uniforms(row_seeds, positions + at, STREAM_TEACHER)
    replacement = sample_from_logits(teacher_logits[rows, at], u, teacher_temperature, teacher_top_p)
    return n_accept, replacement


def speculative_spec(spec: SamplingSpec | None, options: dict) -> SamplingSpec:
    """The SKD spec of `speculative_generate`'s and its reference's arguments: `spec`, or one of the keyword options
    (top_k, draft_len, verify_on and SamplingSpec's other fields)."""
    spec = SamplingSpec.from_options("speculative" if spec is None else spec, **options)
    if spec.mode != "speculative":
        raise ValueError(f"speculative_generate samples SamplingSpec.mode='speculative', not {spec.mode!r}.")
    return spec


@torch.no_grad()
def speculative_generate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    spec: SamplingSpec | None = None,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    row_seeds: torch.Tensor | None = None,
    vocab_size: int | None = None,
    **options,
) -> Rollout:
    """SKD rollout: student proposals, teacher top-K verification, teacher replacements; batched with KV caches.

    input_ids / attention_mask (B, P) left-padded prompts. `spec` (mode "speculative"; or, without it, its fields as
    keyword `options`, with top_k, draft_len and verify_on for skd_top_k, skd_draft_len and skd_verify_on):
    temperature / top_p warp the student's proposals, teacher_temperature / teacher_top_p the teacher's
    replacements (teacher_temperature=0: its argmax) and, with skd_verify_on="warped", the top-K test ("raw" tests
    the raw logits); cache_implementation "static" preallocates both caches, "cuda_graph" also replays the
    student's single-token step and the teacher's D-token block step as CUDA graphs (captured once per batch size
    and cache length). eos_token_id None: no EOS stop. row_seeds (B,) int64 fixes each row's randomness (else
    drawn from `generator`). Returns a Rollout whose token_source says, per completion token, SOURCE_STUDENT
    (accepted) or SOURCE_TEACHER (replaced), with stats acceptance_rate, tokens_replaced, teacher_forward_passes,
    student_forward_passes, rounds. vocab_size (the tokenizer's length) cuts both models' logits before proposals,
    the top-K test and replacements, so no id ≥ vocab_size is emitted (rlkd_onpolicy/vocab.py: any number of padding
    rows beyond it; default: the output layers' rows, which must then be the same).
    """
    spec = speculative_spec(spec, options)
    check_prompt(input_ids, attention_mask)
    vocab = sampling_vocabulary(student, teacher, vocab_size)
    spec.check_vocabulary(vocab)
    pad = resolve_pad(pad_token_id, eos_token_id)
    device = input_ids.device
    if spec.cache_implementation == "cuda_graph":
        check_graphable(student)
        check_graphable(teacher)
    row_seeds = resolve_row_seeds(row_seeds, input_ids.shape[0], generator, device)

    start = time.perf_counter()
    with eval_mode(student, teacher):
        tokens, source, completion_mask, counts = _speculative_decode(
            student, teacher, input_ids, attention_mask.long(), row_seeds, spec,
            eos=eos_tensor(eos_token_id, device), pad=pad, vocab=vocab,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    generated = int(completion_mask.sum())
    accepted = int(((source == SOURCE_STUDENT) & completion_mask).sum())
    stats = {
        "generated_tokens": float(generated),
        "seconds": seconds,
        "tokens_per_second": generated / max(seconds, 1e-9),
        "acceptance_rate": accepted / max(generated, 1),
        "tokens_replaced": float(generated - accepted),
        **{k: float(v) for k, v in counts.items()},
    }
    return assemble_rollout(
        input_ids,
        attention_mask,
        tokens,
        completion_mask,
        source,
        pad_token_id=pad,
        stats=stats,
        mode="speculative",
        row_seeds=row_seeds,
    )


def _speculative_decode(student, teacher, input_ids, attention_mask, row_seeds, spec: SamplingSpec, *, eos, pad, vocab):
    """The batched ragged-acceptance loop (see the module docstring). Returns tokens (B, N), source (B, N) int8,
    completion_mask (B, N) bool and forward-pass counts."""
    bsz, prompt_len = input_ids.shape
    device = input_ids.device
    d, max_new_tokens, cache_implementation = spec.skd_draft_len, spec.max_new_tokens, spec.cache_implementation
    # worst case one emitted token per round, each round adds D cache columns
    width = prompt_len - 1 + max_new_tokens * d
    cache_len = width if cache_implementation == "dynamic" else -(-width // 64) * 64
    mask = torch.zeros(bsz, cache_len, dtype=torch.long, device=device)
    mask[:, : prompt_len - 1] = attention_mask[:, :-1]
    graphs = None
    if cache_implementation == "cuda_graph":
        # the student's single-token draft step and the teacher's D-token block step, each replayed as a CUDA graph
        graphs = (graph_bucket(student, bsz, cache_len, device), graph_bucket(teacher, bsz, cache_len, device, q=d))
        for bucket in graphs:
            bucket.reset(attention_mask[:, :-1])
        student_cache, teacher_cache = (bucket.cache for bucket in graphs)
    else:
        student_cache = new_cache(student, cache_implementation, cache_len)
        teacher_cache = new_cache(teacher, cache_implementation, cache_len)
    student_passes = teacher_passes = 0
    if prompt_len > 1:
        prefix_ids, prefix_pos = input_ids[:, :-1], position_ids_from_mask(attention_mask[:, :-1])
        forward_step(student, prefix_ids, mask, prefix_pos, student_cache, prompt_len - 1, last_only=True)
        forward_step(teacher, prefix_ids, mask, prefix_pos, teacher_cache, prompt_len - 1, last_only=True)
        student_passes += 1
        teacher_passes += 1

    last = input_ids[:, -1]
    pos = attention_mask.sum(-1) - 1  # (B,) position id of `last`
    n_out = torch.zeros(bsz, dtype=torch.long, device=device)  # tokens emitted per row
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    # slack of D columns so that a round's scatter never runs off the end
    tokens = torch.full((bsz, max_new_tokens + d), pad, dtype=torch.long, device=device)
    source = torch.full((bsz, max_new_tokens + d), SOURCE_TEACHER, dtype=torch.int8, device=device)
    offsets = torch.arange(d, device=device)
    col = prompt_len - 1  # first cache column of this round's block
    rounds = 0
    while True:
        drafts = torch.empty(bsz, d, dtype=torch.long, device=device)
        mask[:, col : col + d] = 1
        feed = last
        for j in range(d):
            if graphs is not None:
                logits = graphs[0].step(student, feed, (pos + j)[:, None], mask)
            else:
                logits = forward_step(student, feed[:, None], mask, (pos + j)[:, None], student_cache, col + j + 1)
            u = row_uniforms(row_seeds, n_out + j, STREAM_STUDENT)
            feed = sample_from_logits(logits[:, -1, :vocab], u, spec.temperature, spec.top_p)
            drafts[:, j] = feed
        student_passes += d
        block = torch.cat([last[:, None], drafts[:, :-1]], dim=1)
        if graphs is not None:
            teacher_logits = graphs[1].step(teacher, block, pos[:, None] + offsets, mask)
        else:
            teacher_logits = forward_step(teacher, block, mask, pos[:, None] + offsets, teacher_cache, col + d)
        teacher_passes += 1
        n_accept, replacement = verify_drafts(
            drafts,
            teacher_logits[..., :vocab],
            row_seeds,
            n_out,
            top_k=spec.skd_top_k,
            teacher_temperature=spec.teacher_temperature,
            teacher_top_p=spec.teacher_top_p,
            verify_on=spec.skd_verify_on,
        )
        n_emit = torch.where(n_accept < d, n_accept + 1, d)  # also the number of valid block columns
        emitted = torch.where(offsets == n_accept[:, None], replacement[:, None], drafts)
        emitted_source = torch.where(offsets < n_accept[:, None], SOURCE_STUDENT, SOURCE_TEACHER).to(torch.int8)
        # finished rows write only pad, at columns >= their n_out, and stop advancing
        live = (offsets < n_emit[:, None]) & ~done[:, None]
        cols = n_out.clamp_max(max_new_tokens)[:, None] + offsets  # a finished row's n_out may pass N
        tokens.scatter_(1, cols, torch.where(live, emitted, pad))
        source.scatter_(1, cols, torch.where(live, emitted_source, SOURCE_TEACHER).to(torch.int8))
        n_out = n_out + torch.where(done, 0, n_emit)
        if eos is not None:
            done |= (torch.isin(emitted, eos) & live).any(-1)
        done |= n_out >= max_new_tokens
        mask[:, col : col + d] = (offsets < n_emit[:, None]).long()  # rejected columns become holes
        last = emitted.gather(1, (n_emit - 1)[:, None]).squeeze(1)
        # A finished row stops advancing (it emits nothing more), so no row's draft position passes P + N + D - 3: a
        # model with absolute positions (GPT-2) needs P + N + D - 2 of them, which the trainer checks.
        pos = torch.where(done, pos, pos + n_emit)
        col += d
        rounds += 1
        if bool(done.all()):  # one host sync per round of D + 1 forward passes
            break
    tokens, source = tokens[:, :max_new_tokens], source[:, :max_new_tokens]
    completion_mask = first_eos_mask(tokens, eos)
    counts = {"teacher_forward_passes": teacher_passes, "student_forward_passes": student_passes, "rounds": rounds}
    return torch.where(completion_mask, tokens, pad), source, completion_mask, counts


@torch.no_grad()
def reference_speculative_generate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    row_seeds: torch.Tensor,
    spec: SamplingSpec | None = None,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    vocab_size: int | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec for `speculative_generate`, position by position: each row alone, full forward passes, no cache.

    At output position t: x ~ student (uniform (seed, t, STREAM_STUDENT)); keep x if it passes the teacher's top-K
    test, else emit the teacher's sample (uniform (seed, t, STREAM_TEACHER)). Returns tokens (B, N), source (B, N)
    and completion_mask (B, N), like the batched path. `spec` and `options` as for `speculative_generate` (the law
    does not depend on skd_draft_len or the cache).
    """
    spec = speculative_spec(spec, options)
    temperature, top_p = spec.temperature, spec.top_p
    teacher_temperature, teacher_top_p = spec.teacher_temperature, spec.teacher_top_p
    vocab = min(output_rows(student), output_rows(teacher))
    vocab = vocab if vocab_size is None else min(vocab, vocab_size)
    eos = eos_tensor(eos_token_id, input_ids.device)
    bsz = input_ids.shape[0]
    tokens = torch.full((bsz, spec.max_new_tokens), pad_token_id, dtype=torch.long)
    source = torch.full((bsz, spec.max_new_tokens), SOURCE_TEACHER, dtype=torch.int8)
    for i in range(bsz):
        seq = input_ids[i][attention_mask[i].bool()].tolist()
        seed = row_seeds[i : i + 1].cpu()
        for t in range(spec.max_new_tokens):
            s_logits = student(input_ids=torch.tensor([seq], device=model_device(student))).logits[0, -1, :vocab]
            t_logits = teacher(input_ids=torch.tensor([seq], device=model_device(teacher))).logits[0, -1, :vocab]
            x = sample_from_logits(s_logits[None].cpu(), row_uniforms(seed, t, STREAM_STUDENT), temperature, top_p)
            keep = topk_accept(
                x,
                t_logits[None].cpu(),
                top_k=spec.skd_top_k,
                teacher_temperature=teacher_temperature,
                teacher_top_p=teacher_top_p,
                verify_on=spec.skd_verify_on,
            )
            if bool(keep[0]):
                tok, src = int(x[0]), SOURCE_STUDENT
            else:
                y = sample_from_logits(
                    t_logits[None].cpu(), row_uniforms(seed, t, STREAM_TEACHER), teacher_temperature, teacher_top_p
                )
                tok, src = int(y[0]), SOURCE_TEACHER
            tokens[i, t], source[i, t] = tok, src
            seq.append(tok)
            if eos is not None and tok in eos.tolist():
                break
    completion_mask = first_eos_mask(tokens, eos.cpu() if eos is not None else None)
    return torch.where(completion_mask, tokens, pad_token_id), source, completion_mask
