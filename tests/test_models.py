"""The embedded SmolLM2 teacher (real GGUF), its saveable conversion, the student cut from it, and the loader."""

import pytest
import tiny_models
import torch
from transformers import LlamaForCausalLM

from rlkd_onpolicy import models
from rlkd_onpolicy.models import (
    SMOLLM2_GGUF,
    embedded_smollm2_path,
    evenly_spaced_layers,
    load_embedded_smollm2,
    load_model_and_tokenizer,
    student_from_teacher,
)


def tiny_llama(layers: int = 5) -> LlamaForCausalLM:
    return tiny_models.tiny_llama(97, hidden=16, layers=layers, tie_word_embeddings=True, max_position_embeddings=2048,
                                  **tiny_models.HF_SPECIAL_IDS).eval()  # fmt: skip


@pytest.mark.parametrize(
    "total,keep,expected",
    [(30, 6, (0, 6, 12, 17, 23, 29)), (30, 1, (0,)), (4, 4, (0, 1, 2, 3)), (5, 2, (0, 4))],  # default, edge cases
)
def test_evenly_spaced_layers(total, keep, expected):
    assert evenly_spaced_layers(total, keep) == expected


@pytest.mark.parametrize("keep", [0, 31])  # no layer, more layers than the teacher has
def test_evenly_spaced_layers_rejects_bad_counts(keep):
    with pytest.raises(ValueError, match=f"keep={keep} layers must be between 1 and the teacher's 30 layers"):
        evenly_spaced_layers(30, keep)


def test_student_copies_the_chosen_layers():
    teacher = tiny_llama(5)
    student = student_from_teacher(teacher, layers=(0, 2, 4))
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert student.config.vocab_size == teacher.config.vocab_size
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight, rtol=0, atol=0)
    for s_index, t_index in enumerate((0, 2, 4)):
        s_state, t_state = student.model.layers[s_index].state_dict(), teacher.model.layers[t_index].state_dict()
        for key in s_state:
            torch.testing.assert_close(s_state[key], t_state[key], rtol=0, atol=0)
    # a copy, not shared storage: training the student leaves the teacher untouched
    s_weight, t_weight = student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight
    assert s_weight.data_ptr() != t_weight.data_ptr()
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    # a student made of all the teacher's layers is the teacher
    ids = torch.randint(0, 97, (2, 7))
    full = student_from_teacher(teacher, layers=5)
    torch.testing.assert_close(full(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("layers", [(0, 0, 1), (0, 5), ()])  # duplicate, out of range, empty
def test_student_rejects_bad_layers(layers):
    with pytest.raises(ValueError, match="distinct indices"):
        student_from_teacher(tiny_llama(5), layers=layers)


def test_student_needs_a_decoder_with_layers():
    with pytest.raises(ValueError, match="needs a decoder-only model with `model.layers`.*got Linear"):
        student_from_teacher(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("pad", [True, False])  # the tokenizer's own pad token; none, so EOS pads
def test_loader_reads_a_saved_folder_ready_for_batched_generation(tmp_path, pad):
    model = tiny_models.tiny_llama(64, seed=4)
    tokenizer = tiny_models.tiny_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert not loaded.training and loaded_tokenizer.padding_side == "left"
    expected_pad = tokenizer.pad_token_id if pad else tokenizer.eos_token_id
    assert loaded_tokenizer.pad_token_id == expected_pad == loaded.config.pad_token_id
    assert loaded.generation_config.pad_token_id == expected_pad
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("the cat sees a dog").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_embedded_smollm2_path_names_the_shipped_gguf():
    folder, name = embedded_smollm2_path()
    assert name == SMOLLM2_GGUF and (folder / name).is_file()


def test_public_names():
    assert all(callable(getattr(models, name)) for name in models.__all__ if name != "SMOLLM2_GGUF")


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*HF_HUB_OFFLINE"):
        load_model_and_tokenizer(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer("./checkpoints/teacher")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path))


@pytest.mark.slow
def test_embedded_smollm2_saves_reloads_and_shrinks(tmp_path):
    # ~40 s on 2 cores: two GGUF-free loads of a 135M model plus the dequantisation of the GGUF.
    teacher, tokenizer = load_embedded_smollm2()
    assert type(teacher) is LlamaForCausalLM and teacher.dtype == torch.float32
    assert teacher.config.num_hidden_layers == 30 and teacher.config.hidden_size == 576
    assert teacher.config.vocab_size == 49152 and len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    assert getattr(teacher.config, "quantization_config", None) is None
    assert abs(sum(p.numel() for p in teacher.parameters()) - 134.5e6) < 0.1e6

    teacher.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    ids = tokenizer("Translate from English to French:\nIn the beginning was the Word.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    assert reloaded_tokenizer("In the beginning").input_ids == tokenizer("In the beginning").input_ids

    student = student_from_teacher(teacher, 6)
    assert student.config.num_hidden_layers == 6
    assert 45e6 < sum(p.numel() for p in student.parameters()) < 55e6
    last_student, last_teacher = student.model.layers[5], teacher.model.layers[29]
    torch.testing.assert_close(last_student.self_attn.q_proj.weight, last_teacher.self_attn.q_proj.weight)
