"""The student on a vLLM server: its rollouts are generated there, and its weights are pushed there before a rollout.

`StudentServer` talks to a stock `vllm serve` started in dev mode (`VLLM_SERVER_DEV_MODE=1`, docs/vllm_rollouts.md)
through its HTTP API, with the standard library only (the main environment never imports vLLM):
- `check()` at construction: the server serves one model whose tokenizer decodes every id as the student's does, whose
  model accepts as many ids as the student's output layer has rows, and whose config (architecture, layers, widths)
  is the student's; each mismatch names the field;
- `sync_from_folder(folder, version)` swaps the server's weights for a safetensors checkpoint the trainer wrote:
  /pause (mode "wait": no request is cut), POST /collective_rpc reload_weights, /update_weight_version, /resume;
- `check_version(expected)`: the server still holds the weights of the last sync (a restarted server comes back
  with its start-up weights and a fresh version, which this catches);
- `generate(prompts, ...)`: each row a /v1/completions request (token ids in, token ids out).

The vocabulary policy (rlkd_onpolicy/vocab.py): the model may have output rows beyond the tokenizer; every request
biases those ids by vLLM's largest negative logit bias (-100), and a returned id ≥ the tokenizer's length is refused
with an error, never trained on.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from rlkd_onpolicy.teacher.served import (
    RETRIED_HTTP,
    ServerOptions,
    _first_difference,
    _id_chunks,
    _in_pool,
    vocabulary_hash,
)

# The config fields that must agree between the student and the served model for its weights to load there.
ARCHITECTURE_FIELDS = (
    "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "vocab_size",
)  # fmt: skip
# vLLM clamps a logit bias to [-100, 100]; e^-100 relative probability is zero in float32 sampling.
PADDING_BIAS = -100.0


class StudentServerError(RuntimeError):
    """The student's vLLM server did not answer, refused a request, or does not serve this student."""


class _Rejected(StudentServerError):
    def __init__(self, text: str, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(text)


def _reply_message(error: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(error.read())
    except (ValueError, OSError):
        return str(error.reason)
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            return str(inner.get("message") or inner)
        return str(inner or payload.get("detail") or payload.get("message") or payload)
    return str(payload)


class StudentServer:
    """A client of the vLLM server that generates the student's rollouts.

    Args:
        url: base URL, e.g. "http://127.0.0.1:8000" (no /v1).
        tokenizer: the student's tokenizer; vocab_size its length (the ids everything trains on).
        output_rows: rows of the student's output layer (≥ vocab_size; the rest are padding rows).
        config: the student's `PretrainedConfig` (its ARCHITECTURE_FIELDS are compared with the server's).
        options: timeouts and retries (`ServerOptions`; the teacher server's); timeout is vllm_server_timeout.
    """

    def __init__(self, url: str, *, tokenizer, vocab_size: int, output_rows: int, config=None,
                 options: ServerOptions | None = None, check: bool = True):  # fmt: skip
        url = url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.tokenizer, self.vocab_size, self.output_rows, self.config = tokenizer, vocab_size, output_rows, config
        self.options = options or ServerOptions()
        self.model: str | None = None
        self.max_model_len = 0
        self.logit_bias = {str(i): PADDING_BIAS for i in range(vocab_size, output_rows)}
        if check:
            self.check()

    # -- HTTP ------------------------------------------------------------------------------------------------------

    def request(self, path: str, body: dict | None = None, *, where: str = "", method: str | None = None,
                retries: int | None = None, timeout: float | None = None):  # fmt: skip
        """JSON over HTTP with bounded exponential backoff on connection errors and 429/5xx (4xx are raised at
        once). `where` ends each message (" at training step 3"). Returns the decoded JSON (None for an empty
        body)."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        method = method or ("GET" if data is None else "POST")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempts = (self.options.retries if retries is None else retries) + 1
        timeout = timeout or self.options.timeout
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.options.delay(attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    raw = response.read()
                    return json.loads(raw) if raw.strip() else None
            except urllib.error.HTTPError as error:
                message = _reply_message(error)
                if error.code not in RETRIED_HTTP:
                    raise _Rejected(f"The student's vLLM server at {url} rejected the request{where} (HTTP "
                                    f"{error.code}): {message}", error.code, message) from None  # fmt: skip
                last = f"HTTP {error.code}: {message}"
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}"
        raise StudentServerError(
            f"The student's vLLM server at {url} did not answer{where} after {attempts} attempt(s) (timeout "
            f"{timeout:g} s); last error: {last}. Check that the server runs (docs/vllm_rollouts.md has the command) "
            "or raise vllm_server_timeout."
        )

    # -- checks before training ------------------------------------------------------------------------------------

    def wait_until_up(self, timeout: float) -> None:
        """Poll GET /health until the server answers (it may still be loading), at most `timeout` seconds."""
        deadline, last = time.monotonic() + timeout, ""
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=min(10.0, timeout)) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            if time.monotonic() >= deadline:
                raise StudentServerError(
                    f"The student's vLLM server at {self.url} did not answer /health within vllm_server_timeout="
                    f"{timeout:g} s ({last}). Start it (docs/vllm_rollouts.md: VLLM_SERVER_DEV_MODE=1 vllm serve "
                    "<the student's folder>), or fix vllm_server_base_url / vllm_server_host / vllm_server_port."
                )
            time.sleep(1.0)

    def check(self) -> None:
        """The server answers, serves one model with the student's tokenizer, vocabulary and architecture, and has
        the dev-mode endpoints the weight sync needs. Raises StudentServerError naming the URL and the field."""
        models = self.request("/v1/models", where=" (listing its models)")
        cards = {card["id"]: card for card in (models or {}).get("data", [])}
        if len(cards) != 1:
            raise StudentServerError(f"The student's vLLM server at {self.url} serves {sorted(cards)}; it must serve "
                                     "exactly one model (the student).")  # fmt: skip
        self.model = next(iter(cards))
        self.max_model_len = int(cards[self.model].get("max_model_len") or 0)
        root = cards[self.model].get("root")
        try:
            self.request("/is_paused", where=" (checking the dev-mode endpoints)", retries=0)
        except _Rejected as error:
            raise StudentServerError(
                f"The student's vLLM server at {self.url} has no weight-sync endpoints (GET /is_paused: HTTP "
                f"{error.status}): start it with VLLM_SERVER_DEV_MODE=1 (docs/vllm_rollouts.md)."
            ) from None
        self._check_architecture(root)
        accepted = self._probe_vocab_size()
        if accepted != max(self.output_rows, self.vocab_size):
            raise StudentServerError(
                f"vocab_size: the student's vLLM server at {self.url} ({self.model}) accepts {accepted} token ids, the "
                f"student's output layer has {self.output_rows} rows (tokenizer {self.vocab_size}): serve the student "
                "itself (the same checkpoint the trainer starts from)."
            )
        self._check_tokenizer()

    def _check_architecture(self, root: str | None) -> None:
        """The served model's config against the student's: read from the served folder when this machine sees it
        (every ARCHITECTURE_FIELDS entry), else the layer count from the server's weight names (/weight_checker).
        Widths that differ then fail the first weight sync, which runs at construction."""
        if self.config is None:
            return
        ours = self.config.to_dict()
        served = None
        if root and (Path(root) / "config.json").is_file():
            try:
                served = json.loads((Path(root) / "config.json").read_text())
            except (OSError, ValueError):
                served = None
        if served is None:
            checksums = (self.request("/weight_checker", {"action": "checksum"}, where=" (/weight_checker)") or {})
            layers = {int(m.group(1)) for key in checksums.get("checksums", {})
                      if (m := re.search(r"\.layers\.(\d+)\.", key))}  # fmt: skip
            served = {"num_hidden_layers": max(layers) + 1} if layers else {}
        for name in ARCHITECTURE_FIELDS:
            # a field unset on either side (an in-memory config without `architectures`) is not compared
            if served.get(name) is not None and ours.get(name) is not None and served[name] != ours[name]:
                raise StudentServerError(
                    f"{name}: the student's vLLM server at {self.url} serves a model with {name}={served[name]!r}, "
                    f"the student has {name}={ours[name]!r}; its weights cannot be loaded there. Serve the student's "
                    "own checkpoint (any weights: the trainer syncs them before the first rollout)."
                )

    def _accepts(self, token_id: int) -> bool:
        try:
            self.request("/v1/completions", {"model": self.model, "prompt": [token_id], "max_tokens": 1,
                                             "temperature": 0.0}, where=f" (probing token id {token_id})")  # fmt: skip
            return True
        except _Rejected as error:
            if "out of vocabulary" in error.message or "out of range" in error.message:
                return False
            raise

    def _probe_vocab_size(self) -> int:
        """The ids the server accepts (max of its tokenizer's and its model's), by bisection on its out-of-vocabulary
        check: a rejected probe costs no forward pass."""
        guess = max(self.output_rows, self.vocab_size)
        if not self._accepts(guess - 1):
            low, high = 0, guess - 1
        elif self._accepts(guess):
            low, high = guess, 2**24
        else:
            return guess
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self._accepts(mid) else (low, mid)
        return high

    def _check_tokenizer(self) -> None:
        chunks = _id_chunks(self.vocab_size)

        def detokenize(ids: list[int]) -> str:
            return self.request("/detokenize", {"model": self.model, "tokens": ids}, where=" (/detokenize)")["prompt"]

        served = _in_pool(detokenize, chunks, self.options.max_concurrency)
        local = [self.tokenizer.decode(chunk) for chunk in chunks]
        for ids, theirs, ours in zip(chunks, served, local, strict=True):
            if theirs != ours:
                at = _first_difference(theirs, ours)
                raise StudentServerError(
                    f"tokenizer: the student's vLLM server at {self.url} ({self.model}) has another tokenizer than the "
                    f"student's ({getattr(self.tokenizer, 'name_or_path', '?')}): ids {ids[0]}–{ids[-1]} decode "
                    f"differently (server {theirs[max(0, at - 10) : at + 20]!r} vs {ours[max(0, at - 10) : at + 20]!r};"
                    f" hashes {vocabulary_hash(served)[:12]} vs {vocabulary_hash(local)[:12]})."
                )

    # -- weights -----------------------------------------------------------------------------------------------------

    def weight_version(self, where: str = "") -> str | None:
        return (self.request("/weight_info", where=where) or {}).get("weight_version")

    def check_version(self, expected: str, where: str = "") -> None:
        """The server still holds the weights synced as `expected`; else (restarted, or reloaded by someone else)
        a StudentServerError naming the URL and `where`."""
        version = self.weight_version(where)
        if version != expected:
            raise StudentServerError(
                f"The student's vLLM server at {self.url} no longer holds the weights the trainer synced{where}: its "
                f"weight version is {version!r}, not {expected!r}. It was restarted (or another client reloaded it) "
                "and would generate from other weights; resume from the last checkpoint."
            )

    def sync_from_folder(self, folder: str, version: str, where: str = "") -> None:
        """Load the safetensors checkpoint in `folder` (on a filesystem the server sees) into the server, with
        generation paused so that no request sees half-updated weights; then tag the weights `version`."""
        self.request("/pause?mode=wait", {}, where=f" (pausing for the weight sync{where})")
        try:
            self.request("/collective_rpc", {"method": "reload_weights",
                                             "kwargs": {"weights_path": str(folder), "is_checkpoint_format": True}},
                         where=f" (reload_weights{where})", retries=0)  # fmt: skip
            self.request("/update_weight_version", {"new_version": version}, where=where)
        except StudentServerError as error:
            try:  # leave the server unpaused if it still can be; the reload's error is the one to report
                self.request("/resume", {}, where=where, retries=0)
            except StudentServerError:
                pass
            raise StudentServerError(
                f"{error} A failed reload can leave vLLM's engine dead (vLLM 0.32 on the CPU: EngineCore exits): "
                "restart the server and resume from the last checkpoint."
            ) from None
        self.request("/resume", {}, where=f" (resuming after the weight sync{where})")

    # -- generation --------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seeds: Sequence[int] | None,
        stop_token_ids: Sequence[int] = (),
        where: str = "",
    ) -> list[list[int]]:
        """One completion per prompt (token ids, no padding): at most max_tokens ids each, ending at the first of
        `stop_token_ids` (included) when one comes. Every other sampling setting is pinned to "off", so the
        model folder's generation_config.json (which vLLM applies to unset fields) changes nothing."""
        longest = max((len(p) for p in prompts), default=0) + max_tokens
        if self.max_model_len and longest > self.max_model_len:
            raise ValueError(f"A prompt plus {max_tokens} new tokens needs {longest} positions; the student's vLLM "
                             f"server at {self.url} has --max-model-len {self.max_model_len}: restart it with more.")
        seeds = [None] * len(prompts) if seeds is None else list(seeds)

        def one(row: int) -> list[int]:
            body = {
                "model": self.model, "prompt": list(prompts[row]), "max_tokens": max_tokens,
                "temperature": float(temperature), "top_p": float(top_p), "top_k": -1, "min_p": 0.0,
                "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "stop_token_ids": list(stop_token_ids), "ignore_eos": True, "return_token_ids": True,
                "skip_special_tokens": False,
            }  # fmt: skip
            if self.logit_bias:
                body["logit_bias"] = self.logit_bias
            if seeds[row] is not None:
                body["seed"] = int(seeds[row])
            choices = (self.request("/v1/completions", body, where=where) or {}).get("choices") or []
            if len(choices) != 1 or choices[0].get("token_ids") is None:
                raise StudentServerError(f"The student's vLLM server at {self.url} answered no token ids{where} "
                                         f"(vLLM ≥ 0.10 returns them with return_token_ids).")  # fmt: skip
            ids = [int(t) for t in choices[0]["token_ids"]][:max_tokens]
            beyond = [t for t in ids if not 0 <= t < self.vocab_size]
            if beyond:
                raise StudentServerError(
                    f"The student's vLLM server at {self.url} generated token id {beyond[0]}{where}, outside the "
                    f"tokenizer's {self.vocab_size} ids (a padding row of the output layer); it is never trained on."
                )
            return ids

        return _in_pool(one, range(len(prompts)), self.options.max_concurrency)
