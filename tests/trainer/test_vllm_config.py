"""use_vllm's fields (TRL's names and meanings) and the pieces of the weight sync that need no server: bad values are
refused naming the field, the URL follows TRL's rule, and the weights written for vLLM are the model's own (a tied
output layer under its own name, PEFT adapters merged)."""

import pytest
import torch
from tiny_models import tiny_llama

from rlkd_onpolicy import RLKDConfig
from rlkd_onpolicy.trainer.vllm_sync import WeightSync, checkpoint_state_dict


def _args(tmp_path, **kw):
    return RLKDConfig(output_dir=str(tmp_path), report_to="none", use_vllm=True, **kw)


# Each case: a value the config must refuse, and the words that name it.
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"vllm_mode": "colocate"}, r"vllm_mode='colocate' is invalid: colocate .* needs a GPU"),
        ({"vllm_mode": "remote"}, r"vllm_mode='remote' is invalid"),
        ({"vllm_server_base_url": "127.0.0.1:8000"}, r"vllm_server_base_url='127.0.0.1:8000' is invalid"),
        ({"vllm_server_port": 0}, r"vllm_server_port=0 is invalid"),
        ({"vllm_server_timeout": 0.0}, r"vllm_server_timeout=0.0 is invalid"),
        ({"vllm_sync_steps": 0}, r"vllm_sync_steps=0 is invalid"),
        ({"sampling_mode": "off_policy"}, r"use_vllm=True is invalid: sampling_mode='off_policy' generates nothing"),
    ],
)
def test_bad_vllm_fields_are_refused_naming_the_field(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **fields)


def test_server_url_follows_trl(tmp_path):
    assert _args(tmp_path).vllm_server_url() == "http://0.0.0.0:8000"  # TRL's defaults
    host = _args(tmp_path, vllm_server_host="10.0.0.2", vllm_server_port=8001)
    assert host.vllm_server_url() == "http://10.0.0.2:8001"
    assert _args(tmp_path, vllm_server_base_url="http://gen:9000/", vllm_server_port=1).vllm_server_url() == (
        "http://gen:9000"
    )


def test_tied_output_layer_is_written_under_its_own_name():
    model = tiny_llama(64, tie_word_embeddings=True)
    state = checkpoint_state_dict(model)
    assert torch.equal(state["lm_head.weight"], model.model.embed_tokens.weight)
    head, embedding = state["lm_head.weight"], state["model.embed_tokens.weight"]
    assert head.untyped_storage().data_ptr() != embedding.untyped_storage().data_ptr()  # safetensors refuses sharing
    assert set(state) == set(model.state_dict())


def test_peft_adapters_are_merged_into_the_base_names():
    peft = pytest.importorskip("peft")
    base = tiny_llama(64, seed=3)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    state = checkpoint_state_dict(model)
    expected = model.merge_and_unload().state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, msg=name)


def test_sync_schedule(tmp_path):
    sync = WeightSync(server=None, every=3, folder=str(tmp_path / "sync"))
    assert sync.folder.parent == tmp_path / "sync" and sync.due(0)
    sync.synced_step = 0
    assert [sync.due(step) for step in range(5)] == [False, False, False, True, True]
    sync.reset()
    assert sync.due(1)


def test_nccl_sync_needs_vllm_here(tmp_path):
    """On this CPU machine without vLLM in the training environment "auto" is the file sync and "nccl" is refused."""
    import importlib.util

    from rlkd_onpolicy.trainer.vllm_sync import weight_sync

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable in this environment")
    student = tiny_llama(64)
    assert type(weight_sync(_args(tmp_path), None, student)) is WeightSync
    with pytest.raises(ImportError, match=r"vllm_sync_backend='nccl' .* `pip install vllm`"):
        weight_sync(_args(tmp_path, vllm_sync_backend="nccl"), None, student)
