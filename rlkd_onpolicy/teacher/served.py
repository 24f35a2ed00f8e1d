"""A teacher served by vLLM: the teacher's top-K log-probs at every completion position, through the server's
OpenAI-compatible `/v1/completions` API, as the `SparseTeacher` a top-k cache returns.

Each rollout row is sent as token ids (its left padding stripped: no re-tokenisation), with `prompt_logprobs=K` and
the smallest generation the API allows (`max_tokens=1`). vLLM answers, for every prompt position i ≥ 1, the K most
likely next tokens given tokens < i and their log-probs over the full vocabulary at temperature 1 (its default
`--logprobs-mode raw_logprobs`), plus the sent token itself with its rank; the reply is checked position by position
against what was sent. The tail log-mass is log(1 − Σ top-K), from the returned log-probs.

What is exact and what is not: the K ids and their log-probs are the teacher's, up to the server's float32 rounding
(measured against transformers for SmolLM2-135M: ids identical, log-probs within 1e-4; tests/teacher/). The tail
comes from the K log-probs rather than from the full distribution, so where the tail mass is below ~1e-6 it is
rounding noise (exactly as small in absolute terms, which is what the losses see). Temperature ≠ 1 cannot be
served: log-probs at T need log Σ_v exp(z_v / T) over the whole vocabulary, which K values do not give.

Only the standard library talks to the server (urllib + a thread pool): the main environment never imports vLLM,
and the server runs in its own (`make vllm-env`, docs/served_teacher.md).

The speculative-KD round (`served_speculative_round`) and seq-KD generation (`served_generate`) through the same
server are prototypes the sampler will call (phase 2 of issue 14); they do not depend on the trainer.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from rlkd_onpolicy.losses.divergences import log1mexp
from rlkd_onpolicy.sampling.rollout import SOURCE_TEACHER, Rollout, assemble_rollout, first_eos_mask
from rlkd_onpolicy.teacher.signal import SparseTeacher

# Ids per /detokenize request of the tokenizer check (49,152 ids: 12 requests, ~0.2 s on the test server).
DETOKENIZE_CHUNK = 4096
# The vocabulary probe's upper bound: no tokenizer has 2**24 (16.7M) tokens.
MAX_PROBED_VOCAB = 2**24
# Σ exp(top-K) may exceed 1 by rounding; more than this means the server does not return log-probs.
LOGPROB_SUM_SLACK = 1e-3
RETRIED_HTTP = (429, 500, 502, 503, 504)


class TeacherServerError(RuntimeError):
    """The teacher server did not answer (after every retry), or answered something that cannot be used."""


@dataclass(frozen=True)
class ServerOptions:
    """How the client talks to the server: timeouts, retries and concurrency.

    timeout: seconds one HTTP request may take (a 72B teacher scoring 8 × 4k tokens needs more than the default).
    retries: further attempts after the first, on connection errors, timeouts and HTTP 429/5xx; 4xx are not retried
        (the request is wrong, and asking again gives the same answer).
    backoff / max_backoff: seconds before retry r (r = 0, 1, …) are min(backoff · 2^r, max_backoff).
    max_concurrency: requests in flight at once (a thread pool); vLLM batches concurrent requests itself.
    rows_per_request: rollout rows per completions request (a long batch becomes several requests).
    """

    timeout: float = 300.0
    retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_concurrency: int = 8
    rows_per_request: int = 4

    def __post_init__(self):
        if not self.timeout > 0 or not math.isfinite(self.timeout):
            raise ValueError(f"timeout={self.timeout} must be > 0 seconds (and finite).")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries={self.retries!r} must be an int >= 0 (0: one attempt, no retry).")
        # written so that NaN fails (every comparison with NaN is False); inf waits forever
        if not (0 <= self.backoff <= self.max_backoff) or not math.isfinite(self.max_backoff):
            raise ValueError(f"backoff={self.backoff} and max_backoff={self.max_backoff} need finite "
                             "0 <= backoff <= max_backoff (seconds).")
        for name in ("max_concurrency", "rows_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1.")

    def delay(self, retry: int) -> float:
        return min(self.backoff * 2.0**retry, self.max_backoff)


class _Client:
    """JSON over HTTP to one server, with bounded exponential backoff on transient failures."""

    def __init__(self, url: str, options: ServerOptions):
        self.url = url
        self.options = options

    def request(self, path: str, body: dict | None = None, *, where: str = "") -> dict:
        """GET `path` (body None) or POST `body` as JSON; the decoded JSON reply. `where` ends every error message
        (e.g. " at training step 12")."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempts = self.options.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.options.delay(attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code not in RETRIED_HTTP:
                    raise ServerRejected(url, error.code, message, where) from None
                last = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
                # URLError: refused / unreachable; HTTPException: dropped mid-reply; OSError: reset, timeout;
                # ValueError: a reply cut short that is not valid JSON.
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}"
        raise TeacherServerError(
            f"The teacher server at {url} did not answer{where} after {attempts} attempt(s) (timeout "
            f"{self.options.timeout:g} s, backoff {self.options.backoff:g} s doubling); last error: {last}. Check "
            "that the server runs and is reachable, or raise ServerOptions.retries / timeout."
        )


class ServerRejected(TeacherServerError):
    """The server answered 4xx: the request itself is wrong (not retried)."""

    def __init__(self, url: str, status: int, message: str, where: str = ""):
        self.status, self.message = status, message
        super().__init__(f"The teacher server at {url} rejected the request{where} (HTTP {status}): {message}")


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(error.read())
        return str(payload.get("error", {}).get("message") or payload.get("message") or payload)
    except (ValueError, OSError, AttributeError):
        return error.reason if isinstance(error.reason, str) else str(error)


@dataclass(frozen=True)
class ServerInfo:
    """What `ServedTeacher.check` learnt about the server."""

    url: str
    model: str
    max_model_len: int
    vocab_size: int  # ids the server accepts: max(its tokenizer's, its model's output rows)
    tokenizer_hash: str  # SHA-256 of its detokenised vocabulary, chunk by chunk (see `vocabulary_hash`)
    max_logprobs_ok: int  # the K this check verified the server returns


def vocabulary_hash(chunks: Sequence[str]) -> str:
    """SHA-256 of a vocabulary detokenised chunk by chunk (each chunk length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in chunks:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _id_chunks(vocab: int) -> list[list[int]]:
    return [list(range(s, min(s + DETOKENIZE_CHUNK, vocab))) for s in range(0, vocab, DETOKENIZE_CHUNK)]


def _in_pool(fn: Callable, items: Sequence, workers: int) -> list:
    """fn over items with at most `workers` in flight, results in order; the first exception propagates."""
    if len(items) <= 1 or workers == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


@dataclass(frozen=True)
class RowSpan:
    """Row `row` of a rollout as sent: columns [start, end) (left padding stripped), completion from `prompt`."""

    row: int
    start: int
    prompt: int
    end: int


def rollout_spans(rollout: Rollout) -> list[RowSpan]:
    """The column span to send for each row that has counted completion tokens; checks the layout it relies on
    (a left-padded prompt, then one contiguous run of counted completion tokens)."""
    p = rollout.prompt_length
    attention = rollout.attention_mask.bool().cpu()
    counted = rollout.completion_mask.bool().cpu()
    spans = []
    for row in range(rollout.sequences.shape[0]):
        n = int(counted[row, p:].sum())
        if n == 0:
            continue
        prompt_real = attention[row, :p]
        start = p - int(prompt_real.sum())
        if start == p:
            raise ValueError(
                f"Row {row} of the rollout has completion tokens but no prompt token; the teacher's distribution "
                "over a first token needs at least one token before it."
            )
        if not bool(prompt_real[start:].all()) or bool(counted[row, :p].any()):
            raise ValueError(
                f"Row {row}'s prompt is not left-padded (attention mask {prompt_real.int().tolist()}): the served "
                "teacher sends each row without its padding and needs the real prompt tokens at the right."
            )
        if not bool(counted[row, p : p + n].all()):
            raise ValueError(
                f"Row {row}'s counted completion tokens are not one run starting at column {p}; a rollout's "
                "completion mask is True up to the first EOS, then False."
            )
        spans.append(RowSpan(row, start, p, p + n))
    return spans


class ServedTeacher:
    """The teacher's top-K from a vLLM server, as a `SparseTeacher` (the `Teacher` protocol of `signal.py`).

    Args:
        url: the server's base URL, e.g. "http://teacher:8000" (no trailing /v1).
        tokenizer: the student's tokenizer; the server's must be the same (checked at construction).
        top_k: K, the teacher log-probs kept per position; at most the server's `--max-logprobs` (checked).
        vocab_size: the ids the student uses (default len(tokenizer), as the trainer passes); the server must accept
            at least these ids, and any it accepts beyond them are padding rows (rlkd_onpolicy/vocab.py), whatever
            their number.
        model: the served model's name; None takes the only one the server serves.
        temperature: the loss temperature; only 1.0 can be served exactly (see the module docstring).
        options: timeouts, retries, concurrency (`ServerOptions`).
        check: run `check()` now (the default); False only for a caller that checks later itself.

    Example (needs a running vLLM server, hence skipped as a doctest):
        >>> teacher = ServedTeacher("http://127.0.0.1:8000", tokenizer=tokenizer, top_k=64)  # doctest: +SKIP
        >>> signal = teacher.score(rollout)  # SparseTeacher (B, C, 64)  # doctest: +SKIP
        >>> distillation_loss(student_logits, **signal.loss_inputs(), loss="fkl", mask=mask)  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        *,
        tokenizer,
        top_k: int,
        vocab_size: int | None = None,
        model: str | None = None,
        temperature: float = 1.0,
        options: ServerOptions | None = None,
        check: bool = True,
    ):
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"teacher server url={url!r} must look like 'http://host:port'.")
        url = url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be an int >= 1 (the teacher log-probs per position).")
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature} cannot be served exactly: the server returns log-probs at temperature 1, "
                "and log-probs at T need the normaliser over the whole vocabulary, which the top-K does not give. "
                "Use temperature=1.0 with a served teacher, or a local teacher / a cache built at that temperature."
            )
        self.url = url
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.vocab_size = len(tokenizer) if vocab_size is None else int(vocab_size)
        self.model = model
        self.temperature = temperature
        self.options = options or ServerOptions()
        self._client = _Client(url, self.options)
        self.info: ServerInfo | None = None
        if check:
            self.check()

    # -- checks before training -------------------------------------------------------------------------------------

    def check(self) -> ServerInfo:
        """Ask the server, before any training: it answers, serves the model, shares the student's tokenizer, and
        returns K log-probs per position. Raises TeacherServerError (naming the URL) on the first failure."""
        models = self._client.request("/v1/models", where=" (listing its models)")
        cards = {card["id"]: card for card in models.get("data", [])}
        if self.model is None:
            if len(cards) != 1:
                raise TeacherServerError(
                    f"The teacher server at {self.url} serves {sorted(cards)}; pass model= to choose one."
                )
            self.model = next(iter(cards))
        elif self.model not in cards:
            raise TeacherServerError(
                f"The teacher server at {self.url} does not serve model={self.model!r}; it serves {sorted(cards)}."
            )
        max_model_len = int(cards[self.model].get("max_model_len") or 0)
        server_vocab = self._probe_vocab_size()
        if server_vocab < self.vocab_size:
            raise TeacherServerError(
                f"The teacher server at {self.url} ({self.model}) accepts {server_vocab} token ids, fewer than the "
                f"student's {self.vocab_size} ({getattr(self.tokenizer, 'name_or_path', '?')}): it does not serve a "
                "model of the student's tokenizer. Serve a teacher with the student's tokenizer."
            )
        server_hash = self._check_same_tokenizer(min(len(self.tokenizer), server_vocab))
        self._check_top_k()
        self.info = ServerInfo(self.url, self.model, max_model_len, server_vocab, server_hash, self.top_k)
        return self.info

    def _generate(self, prompt: list[int], where: str = "", **fields) -> dict:
        """One completions request for `prompt` (token ids); greedy, one new token unless `fields` say otherwise."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, **fields}
        return self._client.request("/v1/completions", body, where=where)

    def _accepts(self, token_id: int) -> bool:
        try:
            self._generate([token_id], where=f" (probing token id {token_id})")
            return True
        except ServerRejected as error:
            if "out of vocabulary" in error.message:
                return False
            raise

    def _probe_vocab_size(self) -> int:
        """The number of ids the server accepts, by bisection on its 'Token id N is out of vocabulary' check
        (vLLM validates prompt ids before scheduling, so a rejected probe costs no forward; ~25 requests)."""
        low, high = 0, MAX_PROBED_VOCAB  # low accepted (id 0), high rejected
        if not self._accepts(0):
            raise TeacherServerError(f"The teacher server at {self.url} refuses token id 0.")
        guess = self.vocab_size + 256  # a first probe just above the usual embedding padding
        if self._accepts(guess):
            low = guess
        else:
            high = guess
        while high - low > 1:
            mid = (low + high) // 2
            if self._accepts(mid):
                low = mid
            else:
                high = mid
        return high

    def _detokenize(self, ids: list[int]) -> str:
        return self._client.request("/detokenize", {"model": self.model, "tokens": ids}, where=" (/detokenize)")[
            "prompt"
        ]

    def _check_same_tokenizer(self, vocab: int) -> str:
        """The server's tokenizer decodes ids 0 … vocab-1 as the student's does (compared chunk by chunk); returns
        the server's vocabulary hash."""
        chunks = _id_chunks(vocab)
        served = _in_pool(self._detokenize, chunks, self.options.max_concurrency)
        local = [self.tokenizer.decode(chunk) for chunk in chunks]
        for ids, theirs, ours in zip(chunks, served, local, strict=True):
            if theirs != ours:
                at = _first_difference(theirs, ours)
                raise TeacherServerError(
                    f"The teacher server at {self.url} ({self.model}) has another tokenizer than the student's "
                    f"({getattr(self.tokenizer, 'name_or_path', '?')}): token ids {ids[0]}–{ids[-1]} decode "
                    f"differently (server {theirs[max(0, at - 10) : at + 20]!r} vs student "
                    f"{ours[max(0, at - 10) : at + 20]!r}; vocabulary hashes {vocabulary_hash(served)[:12]} vs "
                    f"{vocabulary_hash(local)[:12]}). Token-level distillation needs one tokenizer."
                )
        return vocabulary_hash(served)

    def _check_top_k(self) -> None:
        try:
            reply = self._generate([0, 1], prompt_logprobs=self.top_k, where=" (checking top_k)")
        except ServerRejected as error:
            allowed = re.search(r"max allowed: (\d+)", error.message)
            if allowed is None:
                raise
            raise TeacherServerError(
                f"top_k={self.top_k} exceeds the teacher server's --max-logprobs {allowed.group(1)} ({self.url}); "
                f"restart it with --max-logprobs {self.top_k} or more, or lower top_k."
            ) from None
        entries = reply["choices"][0]["prompt_logprobs"][1]
        if len(entries) < self.top_k:
            raise TeacherServerError(
                f"The teacher server at {self.url} returned {len(entries)} log-probs for prompt_logprobs={self.top_k}."
            )

    # -- scoring ------------------------------------------------------------------------------------------------------

    def score(self, rollout: Rollout, example_index: torch.Tensor | None = None, *, step: int | None = None):
        """The teacher's top-K at `rollout`'s completion positions: a `SparseTeacher` (B, C, K) on the rollout's
        device. `example_index` is ignored (a served teacher scores whatever it is sent); `step` names the
        training step in errors. Rows without counted tokens and positions past a row's end hold distinct ids
        0…K-1 with log-probs −log K (never read; the cache fills them the same way)."""
        if self.info is None:
            raise RuntimeError("ServedTeacher.score before check(): construct it with check=True or call check().")
        where = "" if step is None else f" at training step {step}"
        spans = rollout_spans(rollout)
        self._check_lengths(spans, where)
        batch, width = rollout.sequences.shape[0], rollout.sequences.shape[1] - rollout.prompt_length
        k = self.top_k
        ids = torch.arange(k, dtype=torch.int64).expand(batch, width, k).clone()
        logprobs = torch.full((batch, width, k), -math.log(k), dtype=torch.float32)
        tail = torch.full((batch, width), float("-inf"), dtype=torch.float32)
        sequences = rollout.sequences.cpu()
        per = self.options.rows_per_request
        groups = [spans[i : i + per] for i in range(0, len(spans), per)]

        def ask(group: list[RowSpan]):
            prompts = [sequences[s.row, s.start : s.end].tolist() for s in group]
            return prompts, self._prompt_logprobs(prompts, where)

        for group, (prompts, replies) in zip(groups, _in_pool(ask, groups, self.options.max_concurrency), strict=True):
            for span, prompt, reply in zip(group, prompts, replies, strict=True):
                first = span.prompt - span.start  # index of the first completion token in the sent ids
                row_ids, row_lp = self._topk_rows(prompt, reply, first, where)
                n = span.end - span.prompt
                ids[span.row, :n] = row_ids
                logprobs[span.row, :n] = row_lp
        tail = self._tail(ids, logprobs, tail, spans, where)
        device = rollout.sequences.device
        return SparseTeacher(ids.to(device), logprobs.to(device), tail.to(device))

    def _check_lengths(self, spans: list[RowSpan], where: str) -> None:
        # The API generates at least one token, so a prompt may hold at most max_model_len - 1 of them.
        limit = self.info.max_model_len - 1 if self.info.max_model_len else None
        for span in spans:
            if limit is not None and span.end - span.start > limit:
                raise ValueError(
                    f"Row {span.row} has {span.end - span.start} tokens{where}; the teacher server at {self.url} "
                    f"scores at most {limit} (its --max-model-len {self.info.max_model_len} minus the one token "
                    "the API must generate). Restart it with a larger --max-model-len or shorten the rollouts."
                )

    def _prompt_logprobs(self, prompts: list[list[int]], where: str) -> list[dict]:
        body = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.top_k,
            "return_token_ids": True,
        }
        choices = self._client.request("/v1/completions", body, where=where).get("choices") or []
        choices = sorted(choices, key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise TeacherServerError(
                f"The teacher server at {self.url} answered {len(choices)} choices for {len(prompts)} prompts{where}."
            )
        return choices

    def _topk_rows(self, sent: list[int], choice: dict, first: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, K) ids and log-probs at sent positions first … len(sent)-1, sorted by decreasing log-prob, after
        checking that the server scored exactly the ids sent."""
        if choice.get("prompt_token_ids") not in (None, sent):
            raise TeacherServerError(
                f"The teacher server at {self.url} scored other prompt ids than those sent{where} (first difference "
                f"at {_first_difference(choice['prompt_token_ids'], sent)}): it must not re-tokenise."
            )
        positions = choice.get("prompt_logprobs")
        if positions is None or len(positions) != len(sent):
            raise TeacherServerError(
                f"The teacher server at {self.url} returned prompt log-probs for "
                f"{None if positions is None else len(positions)} of {len(sent)} positions{where}."
            )
        k = self.top_k
        out_ids = torch.empty(len(sent) - first, k, dtype=torch.int64)
        out_lp = torch.empty(len(sent) - first, k, dtype=torch.float32)
        for j, i in enumerate(range(first, len(sent))):
            entries = positions[i]
            if entries is None or str(sent[i]) not in entries:
                raise TeacherServerError(
                    f"The teacher server at {self.url} did not return sent token {sent[i]} at position {i}{where}: "
                    "its reply does not line up with the request."
                )
            # The top-K plus the sent token when it ranks below K; ties at the K-th place keep the better rank.
            ranked = sorted(entries.items(), key=lambda kv: (-kv[1]["logprob"], kv[1].get("rank") or 0))[:k]
            if len(ranked) < k:
                raise TeacherServerError(
                    f"The teacher server at {self.url} returned {len(ranked)} log-probs at position {i}, not "
                    f"top_k={k}{where}."
                )
            out_ids[j] = torch.tensor([int(tok) for tok, _ in ranked])
            out_lp[j] = torch.tensor([entry["logprob"] for _, entry in ranked])
        return out_ids, out_lp

    def _tail(self, ids, logprobs, tail, spans: list[RowSpan], where: str) -> torch.Tensor:
        """log(1 − Σ top-K) at the scored positions, after checking the values are log-probs over the student's ids."""
        for span in spans:
            n = span.end - span.prompt
            row_ids, row_lp = ids[span.row, :n], logprobs[span.row, :n]
            if int(row_ids.max()) >= self.vocab_size:
                raise TeacherServerError(
                    f"The teacher server at {self.url} ranks token id {int(row_ids.max())} in its top-{self.top_k} "
                    f"(row {span.row}{where}), outside the student's {self.vocab_size} ids."
                )
            lse = torch.logsumexp(row_lp.double(), dim=-1)
            if not bool(torch.isfinite(row_lp).all()) or float(lse.max()) > LOGPROB_SUM_SLACK:
                raise TeacherServerError(
                    f"The teacher server at {self.url} returned values that are not log-probs (top-K mass "
                    f"{float(lse.max().exp()):.4f}, row {span.row}{where}); start it with the default "
                    "--logprobs-mode raw_logprobs."
                )
            tail[span.row, :n] = log1mexp(lse).float()
        return tail


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# -- prototypes for the sampler (phase 2): speculative KD and seq-KD through the server ----------------------------


@dataclass
class SpeculativeRound:
    """One SKD round for B rows. n_accept (B,) leading drafts in the teacher's top-k; replacement (B,) the teacher's
    token for the first rejected draft (-1 where all D passed: no bonus token, as in SKD); topk_ids / topk_logprobs
    (B, D, K) the teacher's top-K at each draft position (the loss signal for the kept tokens, reusable)."""

    n_accept: torch.Tensor
    replacement: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def served_speculative_round(
    teacher: ServedTeacher,
    prefixes: Sequence[Sequence[int]],
    drafts: torch.Tensor,
    *,
    top_k: int,
    teacher_temperature: float = 1.0,
    teacher_top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> SpeculativeRound:
    """Verify the student's drafts with the served teacher and draw its replacements, as `verify_drafts` does with
    a local one (verify_on="raw": the test ranks the teacher's raw log-probs).

    prefixes: B token-id lists (prompt + tokens emitted so far, no padding); drafts (B, D) the student's proposals.
    Each row costs one request with prompt = prefix + draft and prompt_logprobs = teacher.top_k (a draft passes when
    its rank is ≤ top_k), and a row with a rejection one more: prompt = prefix + accepted drafts, max_tokens=1 at
    teacher_temperature / teacher_top_p (0: greedy) with the row's seed, i.e. a sample from the teacher's warped
    distribution p' — the SKD law P(t) = q(t)·1[t ∈ A] + (1 − q(A))·p'(t). vLLM skips reading its prefix cache for
    requests with prompt_logprobs, so the verification request re-reads the whole prefix; the replacement request
    does hit the cache (docs/served_teacher.md has the cost per round).
    """
    if teacher.info is None:
        raise RuntimeError("served_speculative_round needs a checked ServedTeacher.")
    if not isinstance(top_k, int) or not 1 <= top_k <= teacher.top_k:
        raise ValueError(
            f"top_k={top_k!r} must be in [1, teacher.top_k={teacher.top_k}]: the test reads the teacher's returned "
            "ranks, and the round's loss signal is its top-K."
        )
    if drafts.dim() != 2 or drafts.shape[0] != len(prefixes) or drafts.shape[1] < 1:
        raise ValueError(f"drafts must be (B={len(prefixes)}, D >= 1); got {tuple(drafts.shape)}.")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token (the teacher scores the draft given it).")
    bsz, d = drafts.shape
    seeds = list(seeds) if seeds is not None else [None] * bsz
    if len(seeds) != bsz:
        raise ValueError(f"seeds must have B={bsz} entries; got {len(seeds)}.")
    start = time.perf_counter()
    draft_lists = drafts.cpu().tolist()

    def verify(row: int):
        sent = list(prefixes[row]) + draft_lists[row]
        choice = teacher._prompt_logprobs([sent], "")[0]
        ids, lp = teacher._topk_rows(sent, choice, len(prefixes[row]), "")
        ranks = [choice["prompt_logprobs"][len(prefixes[row]) + j][str(t)].get("rank") for j, t in enumerate(sent[-d:])]
        return ids, lp, ranks

    verified = _in_pool(verify, range(bsz), teacher.options.max_concurrency)
    n_accept = torch.zeros(bsz, dtype=torch.int64)
    for row, (_, _, ranks) in enumerate(verified):
        passes = [r is not None and r <= top_k for r in ranks]
        n_accept[row] = next((j for j, ok in enumerate(passes) if not ok), d)

    def replace(row: int) -> int:
        prompt = list(prefixes[row]) + draft_lists[row][: int(n_accept[row])]
        fields = {"temperature": float(teacher_temperature), "top_p": float(teacher_top_p), "return_token_ids": True}
        if seeds[row] is not None:
            fields["seed"] = int(seeds[row])
        choice = teacher._generate(prompt, **fields)["choices"][0]
        return int(choice["token_ids"][0])

    rejected = [row for row in range(bsz) if int(n_accept[row]) < d]
    replacement = torch.full((bsz,), -1, dtype=torch.int64)
    for row, token in zip(rejected, _in_pool(replace, rejected, teacher.options.max_concurrency), strict=True):
        replacement[row] = token
    stats = {
        "seconds": time.perf_counter() - start,
        "requests": float(bsz + len(rejected)),
        "acceptance_rate": float(n_accept.sum()) / (bsz * d),
    }
    return SpeculativeRound(
        n_accept,
        replacement,
        torch.stack([v[0] for v in verified]),
        torch.stack([v[1] for v in verified]),
        stats,
    )


def served_generate(
    teacher: ServedTeacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    row_seeds: torch.Tensor | None = None,
) -> Rollout:
    """seq-KD through the server: the teacher samples each row's completion (`/v1/completions`), as a `Rollout`
    whose completion tokens are SOURCE_TEACHER.

    input_ids / attention_mask (B, P) left-padded prompts, sent without padding. temperature / top_p warp the
    teacher (0: greedy). The server stops at `eos_token_id` only (its own EOS is ignored, so the completion ends
    where the library's sampler would end it: at and including the first of these ids). row_seeds (B,) give each
    row its own request seed; the same seed reproduces the row on the same server build.
    """
    if teacher.info is None:
        raise RuntimeError("served_generate needs a checked ServedTeacher.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1].")
    bsz, width = input_ids.shape
    if row_seeds is not None and row_seeds.shape != (bsz,):
        raise ValueError(f"row_seeds must have shape ({bsz},); got {tuple(row_seeds.shape)}.")
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    mask = attention_mask.bool().cpu()
    prompts = []
    for row in range(bsz):
        real = mask[row]
        start = width - int(real.sum())
        if start == width or not bool(real[start:].all()):
            raise ValueError(f"Row {row}'s prompt must be left-padded and non-empty; its mask: {real.int().tolist()}.")
        prompts.append(input_ids[row, start:].tolist())
    limit = teacher.info.max_model_len
    longest = max(len(p) for p in prompts) + max_new_tokens
    if limit and longest > limit:
        raise ValueError(
            f"A prompt plus max_new_tokens={max_new_tokens} needs {longest} positions; the teacher server at "
            f"{teacher.url} has --max-model-len {limit}."
        )
    start = time.perf_counter()

    def sample(row: int) -> list[int]:
        fields = {
            "max_tokens": max_new_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "stop_token_ids": eos,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        if row_seeds is not None:
            fields["seed"] = int(row_seeds[row])
        return list(teacher._generate(prompts[row], **fields)["choices"][0]["token_ids"])[:max_new_tokens]

    outputs = _in_pool(sample, range(bsz), teacher.options.max_concurrency)
    tokens = torch.full((bsz, max_new_tokens), pad_token_id, dtype=torch.int64)
    for row, out in enumerate(outputs):
        tokens[row, : len(out)] = torch.tensor(out, dtype=torch.int64)
    lengths = torch.tensor([len(o) for o in outputs])
    completion_mask = torch.arange(max_new_tokens) < lengths.unsqueeze(1)
    completion_mask &= first_eos_mask(tokens, torch.tensor(eos, dtype=torch.int64) if eos else None)
    seconds = time.perf_counter() - start
    generated = int(completion_mask.sum())
    device = input_ids.device
    return assemble_rollout(
        input_ids,
        attention_mask,
        tokens.to(device),
        completion_mask.to(device),
        torch.full_like(tokens, SOURCE_TEACHER).to(device),
        pad_token_id=pad_token_id,
        stats={"generated_tokens": float(generated), "seconds": seconds, "tokens_per_second": generated / seconds},
        mode="seq_kd",
        row_seeds=row_seeds,
    )

