"""Translation evaluation on tiny random Llamas with SmolLM2's real tokenizer and chat template, and real sacrebleu."""

import doctest
import math

import pytest
import torch
from tiny_models import tiny_llama
from transformers import AutoTokenizer, LlamaForCausalLM

from rlkd_onpolicy import eval as evaluation
from rlkd_onpolicy.data.parallel import load_bible_pairs
from rlkd_onpolicy.eval import bleu_chrf, evaluate_translation, generate_translations, kl_sum, teacher_forced_agreement
from rlkd_onpolicy.models import embedded_smollm2_path


@pytest.fixture(scope="module")
def tokenizer():
    folder, name = embedded_smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(seed: int, vocab: int = 49152) -> LlamaForCausalLM:
    return tiny_llama(vocab, hidden=16, layers=2, seed=seed, heads=2, kv_heads=1, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2).eval()  # fmt: skip


@pytest.fixture(scope="module")
def pairs():
    return load_bible_pairs("en", "fr", "test", max_chars=80, limit=6)


def test_bleu_chrf_with_sacrebleu():
    refs = ["Au commencement était la Parole.", "Car Dieu a tant aimé le monde."]
    perfect = bleu_chrf(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    partial = bleu_chrf(["Au commencement était la Parole.", "Dieu aime le monde."], refs)
    assert 0.0 < partial["bleu"] < 100.0 and 0.0 < partial["chrf"] < 100.0
    assert bleu_chrf(["xyz", "qqq"], refs)["bleu"] == 0.0
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        bleu_chrf(["a"], refs)


def test_module_examples_and_public_names():
    from rlkd_onpolicy.eval import translation

    results = [doctest.testmod(module) for module in (translation, evaluation)]  # the examples needing models skip
    assert results[0].attempted > 0 and all(result.failed == 0 for result in results)
    assert all(callable(getattr(evaluation, name)) for name in evaluation.__all__)


def test_kl_sum_matches_the_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, count = kl_sum(student, teacher, mask)
    p, q = teacher.softmax(-1), student.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1)[mask.bool()].sum().item()
    assert count == 3 and total == pytest.approx(expected, rel=1e-5)
    assert kl_sum(student, teacher, torch.zeros(2, 3)) == (0.0, 0)  # all masked: 0, not NaN


def test_generation_is_batched_like_one_by_one(tokenizer, pairs):
    # left padding + position ids: a verse's greedy translation does not depend on its batch neighbours
    model = tiny_model(0)
    batched = generate_translations(model, tokenizer, pairs, "en", "fr", batch_size=4, max_new_tokens=6)
    single = generate_translations(model, tokenizer, pairs, "en", "fr", batch_size=1, max_new_tokens=6)
    assert len(batched) == len(pairs) and all(isinstance(h, str) for h in batched)
    assert batched == single


def test_evaluate_translation_numbers_and_self_kl(tokenizer, pairs):
    model = tiny_model(0)
    result = evaluate_translation(model, tokenizer, pairs, "en", "fr", teacher=model, batch_size=4, max_new_tokens=6)
    assert math.isfinite(result["bleu"]) and 0.0 <= result["bleu"] <= 100.0
    assert math.isfinite(result["chrf"]) and 0.0 <= result["chrf"] <= 100.0
    assert len(result["hypotheses"]) == len(pairs)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)  # KL of a model to itself
    assert result["kl_own"] == pytest.approx(0.0, abs=1e-6)  # also on its own translations
    assert result["tokens"] > len(pairs)  # every reference token (and EOS) counted
    for key in ("cr@1", "cr@10", "mor@5", "spearman@10"):  # rlkd_onpolicy.metrics: a model agrees with itself
        assert result[key] == pytest.approx(1.0)


def test_teacher_forced_kl_is_positive_and_batch_independent(tokenizer, pairs):
    student, teacher = tiny_model(0), tiny_model(1)
    by_4 = teacher_forced_agreement(student, teacher, tokenizer, pairs, "en", "fr", batch_size=4)
    by_1 = teacher_forced_agreement(student, teacher, tokenizer, pairs, "en", "fr", batch_size=1)
    assert by_4["kl"] > 0.0 and by_4["tokens"] == by_1["tokens"]
    assert by_4["kl"] == pytest.approx(by_1["kl"], rel=1e-4)  # padding does not change the per-token KL
    assert by_4["mor@5"] == pytest.approx(by_1["mor@5"]) and 0.0 <= by_4["mor@5"] < 1.0


def test_bad_inputs(tokenizer, pairs):
    with pytest.raises(ValueError, match="vocabulary"):
        # 40,000 rows do not cover the 49,152-token tokenizer: another tokenizer, not padding (rlkd_onpolicy/vocab.py)
        teacher_forced_agreement(tiny_model(0), tiny_model(0, vocab=40000), tokenizer, pairs, "en", "fr")
    with pytest.raises(ValueError, match="No pairs"):
        generate_translations(tiny_model(0), tokenizer, [], "en", "fr")
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_translations(tiny_model(0), tokenizer, pairs, "en", "fr", batch_size=0)


def test_kl_own_is_the_kl_on_the_models_own_translations(tokenizer, pairs):
    student, teacher = tiny_model(0), tiny_model(1)
    result = evaluate_translation(student, tokenizer, pairs, "en", "fr", teacher=teacher, batch_size=4,
                                  max_new_tokens=6)  # fmt: skip
    own = [{**p, "tgt": h} for p, h in zip(pairs, result["hypotheses"], strict=True)]
    expected = teacher_forced_agreement(student, teacher, tokenizer, own, "en", "fr", batch_size=2)["kl"]
    assert result["kl_own"] == pytest.approx(expected, rel=1e-5)
    assert result["kl_own"] > 0.0 and result["kl_own"] != pytest.approx(result["kl"])
    # an empty translation still scores its end-of-turn token: finite, never NaN
    empty = teacher_forced_agreement(student, teacher, tokenizer, [{**pairs[0], "tgt": ""}], "en", "fr")
    assert empty["tokens"] >= 1 and math.isfinite(empty["kl"])


def test_load_translator_prompts_a_saved_student_as_it_was_trained(tokenizer, pairs, tmp_path):
    """A folder as the example saves a distilled student: load_translator reads its languages and prompt format and
    gives the same greedy translations as generate_translations with those settings."""
    import json

    from rlkd_onpolicy.eval import load_translator, translate

    model = tiny_model(3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "translation.json").write_text(json.dumps({"src": "en", "tgt": "fr", "instruction_role": "system"}))
    translator = load_translator(tmp_path, max_new_tokens=6)
    expected = generate_translations(model, tokenizer, pairs[:2], "en", "fr", max_new_tokens=6,
                                     instruction_role="system")  # fmt: skip
    assert translator([p["src"] for p in pairs[:2]]) == expected
    assert translator(pairs[0]["src"]) == expected[0]  # one text in, one string out
    assert translate(model, tokenizer, pairs[0]["src"], "en", "fr", instruction_role="system",
                     max_new_tokens=6) == expected[0]  # fmt: skip
    (tmp_path / "translation.json").unlink()
    with pytest.raises(FileNotFoundError, match="translation.json is missing"):
        load_translator(tmp_path)
