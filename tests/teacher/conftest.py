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
