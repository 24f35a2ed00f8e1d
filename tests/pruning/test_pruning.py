"""Width and depth pruning (rlkd_onpolicy.pruning): units that contribute nothing are the ones removed and the logits
do not move; parameter counts, storage, save/load, the parameter target, the supported families and the refusals."""

import json
import subprocess
import sys

import pytest
import tiny_models
import torch
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from rlkd_onpolicy.pruning import (
    calibration_batches,
    count_parameters,
    measure_importance,
    prune,
    widths_for_params,
)

VOCAB = 61


def llama(**config):
    """A random Llama: 4 query heads in 2 key/value groups, hidden 32, MLP 64, 3 layers, tied embeddings."""
    fields = dict(hidden=32, layers=3, heads=4, kv_heads=2, tie_word_embeddings=True) | config
    return tiny_models.tiny_llama(VOCAB, **fields).eval()


def calibration(seed: int = 0, batches: int = 3):
    """Left-padded batches of random ids, so masked positions are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(4, VOCAB, (4, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        mask[3, :2] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def logits(model, batches):
    with torch.no_grad():
        return [model(**b, position_ids=(b["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits for b in batches]


def assert_same_logits(a, b, batches, atol=1e-5):
    for x, y, batch in zip(logits(a, batches), logits(b, batches), batches, strict=True):
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(x[real], y[real], atol=atol, rtol=1e-5)


def test_zeroed_mlp_neurons_are_the_ones_removed():
    teacher = llama()
    dead = {0: [1, 5, 9, 40], 1: [0, 63, 20, 21], 2: [7, 8, 30, 31]}  # per layer, 4 of its 64 neurons
    with torch.no_grad():
        for layer, neurons in dead.items():
            teacher.model.layers[layer].mlp.up_proj.weight[neurons] = 0  # act(gate) * 0: no input to down_proj
    batches = calibration()
    scores = measure_importance(teacher, batches).mlp
    for layer, neurons in dead.items():
        assert torch.all(scores[layer, neurons] == 0) and torch.all(scores[layer].sort().values[4:] > 0)
    student = prune(teacher, batches, intermediate_size=60)
    assert student.config.intermediate_size == 60
    for layer, neurons in dead.items():
        kept = [n for n in range(64) if n not in neurons]
        torch.testing.assert_close(
            student.model.layers[layer].mlp.down_proj.weight, teacher.model.layers[layer].mlp.down_proj.weight[:, kept]
        )
    assert_same_logits(teacher, student, calibration(seed=1))


def test_a_kv_group_with_zero_values_is_removed_whole():
    teacher = llama(hidden=36, heads=6, kv_heads=3)  # 2 query heads of 6 dimensions per key/value head
    head_dim = teacher.model.layers[0].self_attn.head_dim
    dead = {0: 1, 1: 2, 2: 0}  # the key/value group whose values are zero, per layer
    with torch.no_grad():
        for layer, group in dead.items():
            teacher.model.layers[layer].self_attn.v_proj.weight[group * head_dim : (group + 1) * head_dim] = 0
    batches = calibration()
    scores = measure_importance(teacher, batches).heads
    for layer, group in dead.items():
        assert torch.all(scores[layer, 2 * group : 2 * group + 2] == 0)
        assert scores[layer].count_nonzero() == 4
    student = prune(teacher, batches, num_attention_heads=4)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (4, 2)
    assert student.config.head_dim == head_dim == 6  # written out: hidden_size / heads would now be 9
    assert_same_logits(teacher, student, calibration(seed=1))


def test_zero_embedding_channels_are_removed_and_norms_rescaled():
    teacher = llama()
    dead = [3, 4, 17, 30]  # channels no tensor writes into the residual stream
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, dead] = 0  # tied: the LM head's columns too
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    batches = calibration()
    scores = measure_importance(teacher, batches).hidden
    assert torch.all(scores[dead] == 0) and scores.count_nonzero() == 28
    student = prune(teacher, batches, hidden_size=28)
    assert student.config.hidden_size == 28 and student.model.embed_tokens.weight.shape == (VOCAB, 28)
    assert student.config.rms_norm_eps == pytest.approx(teacher.config.rms_norm_eps * 32 / 28)
    assert_same_logits(teacher, student, calibration(seed=1))


def test_an_identity_layer_is_the_one_dropped():
    teacher = llama(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    batches = calibration()
    influence = measure_importance(teacher, batches).layers
    assert influence[2].abs() < 1e-6 and torch.all(influence[[0, 1, 3]] > 1e-4)
    student = prune(teacher, batches, num_hidden_layers=3)
    assert student.config.num_hidden_layers == 3
    torch.testing.assert_close(
        student.model.layers[2].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight
    )
    assert_same_logits(teacher, student, calibration(seed=1))


def test_every_axis_at_once_counts_saves_and_loads(tmp_path):
    teacher = llama(hidden=36, heads=6, kv_heads=3, layers=4)
    student = prune(
        teacher, calibration(), intermediate_size=40, num_attention_heads=4, hidden_size=24, num_hidden_layers=3
    )
    config = student.config
    assert (
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.hidden_size,
        config.num_hidden_layers,
    ) == (40, 4, 2, 24, 3)
    n_params = sum(p.numel() for p in student.parameters())
    assert (
        n_params
        == count_parameters(type(teacher), config)
        == sum(p.numel() for p in type(teacher)(config).parameters())
    )
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied embeddings stay tied
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.untyped_storage().data_ptr() for p in student.parameters()}
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(teacher) and loaded.config.head_dim == config.head_dim
    assert_same_logits(student, loaded, calibration(seed=2), atol=0)


def test_no_width_gives_an_equal_copy_that_shares_nothing():
    teacher = llama()
    copy = prune(teacher, None)
    assert_same_logits(teacher, copy, calibration(), atol=0)
    with torch.no_grad():
        copy.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(copy.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_params_target_picks_the_largest_model_below_it():
    teacher = llama(hidden=36, heads=6, kv_heads=3, layers=4)
    full = count_parameters(type(teacher), teacher.config)
    for axes in (("intermediate_size",), ("intermediate_size", "num_attention_heads", "hidden_size")):
        target = full - 6000
        widths = widths_for_params(teacher, target, axes)
        assert set(widths) == set(axes)
        student = prune(teacher, calibration(), params=target, axes=axes)
        count = sum(p.numel() for p in student.parameters())
        assert count <= target
        assert count == count_parameters(type(teacher), student.config)
        # One unit more on the MLP axis would pass the target (the search stops at the largest fitting width).
        bigger = dict(widths, intermediate_size=widths["intermediate_size"] + 8)
        if bigger["intermediate_size"] <= 72:
            from rlkd_onpolicy.pruning import pruned_config

            assert count_parameters(type(teacher), pruned_config(teacher.config, **bigger)) > target


@pytest.mark.parametrize(
    "make",
    [  # the other supported families: biases (Qwen2), q/k norms (Qwen3), Mistral
        lambda: Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            )
        ),
        lambda: Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
            )
        ),
        lambda: MistralForCausalLM(
            MistralConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
    ],
)
def test_other_families_prune_and_reload(make, tmp_path):
    torch.manual_seed(0)
    teacher = make().eval()
    student = prune(teacher, calibration(), intermediate_size=32, num_attention_heads=2, hidden_size=24)
    assert sum(p.numel() for p in student.parameters()) == count_parameters(type(teacher), student.config)
    assert torch.isfinite(logits(student, calibration())[0]).all()
    student.save_pretrained(tmp_path)
    assert_same_logits(student, AutoModelForCausalLM.from_pretrained(tmp_path).eval(), calibration(seed=3), atol=0)


def test_qwen2_biases_follow_their_rows():
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    head_dim = 8
    with torch.no_grad():  # group 0's values are zero, bias included: the group outputs nothing
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[:head_dim] = 0
            layer.self_attn.v_proj.bias[:head_dim] = 0
            layer.self_attn.k_proj.bias.normal_()
    student = prune(teacher, calibration(), num_attention_heads=2)
    torch.testing.assert_close(
        student.model.layers[0].self_attn.k_proj.bias, teacher.model.layers[0].self_attn.k_proj.bias[head_dim:]
    )
    assert_same_logits(teacher, student, calibration(seed=1))


@pytest.mark.parametrize(
    "widths,message",
    [  # each impossible request, and what the error names
        ({"intermediate_size": 65}, r"intermediate_size=65 must be an integer in \[1, 64\]"),
        ({"intermediate_size": 0}, r"intermediate_size=0 must be an integer in \[1, 64\]"),
        ({"hidden_size": 8.5}, r"hidden_size=8.5 must be an integer"),
        ({"num_attention_heads": 3}, r"num_attention_heads=3 must be a multiple of 2: heads are pruned as whole"),
        ({"num_hidden_layers": 4}, r"num_hidden_layers=4 must be an integer in \[1, 3\]"),
        ({"vocab_size": 10}, r"Unknown widths \['vocab_size'\]"),
        ({"hidden_size": 30}, r"hidden_size=30 must be a multiple of num_attention_heads=4: transformers' LlamaConfig"),
    ],
)
def test_impossible_widths_are_refused(widths, message):
    with pytest.raises(ValueError, match=message):
        prune(llama(), calibration(), **widths)


def test_refusals_name_the_problem():
    teacher = llama()
    full = count_parameters(type(teacher), teacher.config)
    with pytest.raises(ValueError, match=r"below the teacher's"):
        prune(teacher, calibration(), params=full)
    with pytest.raises(ValueError, match=r"out of reach by shrinking \('intermediate_size',\)"):
        prune(teacher, calibration(), params=1000)
    with pytest.raises(ValueError, match="params= or widths"):
        prune(teacher, calibration(), params=full - 100, intermediate_size=8)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(teacher, None, intermediate_size=8)
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*student_from_teacher"):
        prune(tiny_models.tiny_gpt2(VOCAB), calibration(), intermediate_size=8)
    with pytest.raises(ValueError, match="no real token"):
        prune(
            teacher,
            [{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.zeros(1, 3)}],
            intermediate_size=8,
        )


def test_calibration_batches_read_the_trainer_formats():
    tokenizer = tiny_models.tiny_tokenizer()
    examples = [
        {"text": "the cat sees the dog"},
        {"prompt": "translate to french the cat", "completion": "le chat"},
        {"messages": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "le chien"}]},
        "the red tree",
    ]
    batches = calibration_batches(tokenizer, examples, max_length=6, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    assert batches[0]["attention_mask"].sum(-1).tolist() == [5, 6, 6]  # the prompt–completion rows are cut at 6
    assert tokenizer.decode(batches[1]["input_ids"][0]) == "the red tree"


def test_cli_prunes_to_a_parameter_target_and_reports(tmp_path):
    teacher = llama(hidden=36, heads=6, kv_heads=3)
    tokenizer = tiny_models.tiny_tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "calibration.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"translate to french the {w}", "completion": f"le {w}"})
            for w in ("cat", "dog", "bird", "tree")
        )
        + "\n"
    )
    target = count_parameters(type(teacher), teacher.config) - 3000
    command = [
        sys.executable,
        "-m",
        "rlkd_onpolicy.pruning",
        "--teacher",
        str(tmp_path / "teacher"),
        "--calibration",
        str(data),
        "--params",
        str(target),
        "--axes",
        "intermediate_size,hidden_size",
        "--out",
        str(tmp_path / "student"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "student" / "pruning.json").read_text())
    assert report["student_parameters"] <= target and report["widths"]["num_attention_heads"] == 6
    assert f"{report['student_parameters']:,}" in run.stdout and "intermediate_size: 72 ->" in run.stdout
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert sum(p.numel() for p in student.parameters()) == report["student_parameters"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)  # --out now holds a model
    assert again.returncode != 0 and "exists and is not an empty folder" in again.stderr
