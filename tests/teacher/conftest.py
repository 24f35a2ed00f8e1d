"""One real vLLM server for the whole test session, serving the embedded SmolLM2-135M-Instruct (the local teacher the
served one is compared with), started on a free loopback port and stopped (its process group killed) at the end.

The server runs from `.venv-vllm` (`make vllm-env`; `make test` makes it first). Without that environment the
served-teacher tests skip, saying so; with it, a server that fails to start fails them with its log.
Start-up on 2 shared cores: ~65 s with --enforce-eager (~200 s with torch.compile), so the fixture uses eager mode.
"""

import pytest

from rlkd_onpolicy.teacher.vllm_server import REPO_ROOT, LocalVLLMServer, vllm_python


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(model, tokenizer, folder): the local teacher, saved where the server loads it from (~25 s)."""
    from rlkd_onpolicy.models import load_embedded_smollm2

    folder = tmp_path_factory.mktemp("served") / "smollm2"
    model, tokenizer = load_embedded_smollm2()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer, folder


@pytest.fixture(scope="session")
def vllm_server(smollm2):
    """The running LocalVLLMServer (its `.url`); skips only when the vLLM environment is absent."""
    if vllm_python() is None:
        pytest.skip(f"{REPO_ROOT / '.venv-vllm'} is absent: `make vllm-env` (make test runs it) installs the server")
    server = LocalVLLMServer(smollm2[2], max_logprobs=64, max_model_len=512)
    server.start()
    try:
        server.wait_ready()
        print(f"\nvLLM server ready on {server.url} after {server.startup_seconds:.0f} s")
        yield server
    finally:
        server.stop()


STUDENT_PADDING_ROWS = 64  # output rows beyond the tokenizer: the vocabulary policy must keep them out of rollouts


@pytest.fixture(scope="session")
def vllm_student(smollm2, tmp_path_factory):
    """(server, student, folder) for use_vllm: a 1-layer student of the embedded SmolLM2 with 64 padding rows in its
    output layer, saved to `folder` (the trainers start from it), and a dev-mode vLLM server started on a *stale*
    copy of it (every weight perturbed), so a rollout that is not preceded by a weight sync differs. ~60 s."""
    import torch

    from rlkd_onpolicy.models import student_from_teacher

    if vllm_python() is None:
        pytest.skip(f"{REPO_ROOT / '.venv-vllm'} is absent: `make vllm-env` (make test runs it) installs the server")
    teacher, tokenizer, _ = smollm2
    root = tmp_path_factory.mktemp("vllm_student")
    torch.manual_seed(0)
    student = student_from_teacher(teacher, layers=1)
    student.resize_token_embeddings(len(tokenizer) + STUDENT_PADDING_ROWS, mean_resizing=False)
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    stale = student_from_teacher(teacher, layers=1)
    stale.resize_token_embeddings(len(tokenizer) + STUDENT_PADDING_ROWS, mean_resizing=False)
    with torch.no_grad():
        for param in stale.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    stale.save_pretrained(root / "stale")
    tokenizer.save_pretrained(root / "stale")
    server = LocalVLLMServer(root / "stale", max_logprobs=64, max_model_len=512, env={"VLLM_SERVER_DEV_MODE": "1"})
    server.start()
    try:
        server.wait_ready()
        print(f"\nvLLM student server ready on {server.url} after {server.startup_seconds:.0f} s")
        yield server, student.eval(), root / "student"
    finally:
        server.stop()
