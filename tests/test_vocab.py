"""One vocabulary policy (rlkd_onpolicy/vocab.py): an output layer larger than the tokenizer never yields an id the
tokenizer lacks, in any decode path, in the trainer's rollouts, in a cache, or in `generate` for evaluation.

The models here put a huge bias on the rows beyond the tokenizer (54 tokens, 64 rows), as a padding row that
happens to score high would: without the cut every sampled or greedy token would be one of those rows.
"""

import pytest
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy.sampling import RolloutSampler
from rlkd_onpolicy.sampling.generate import reference_generate
from rlkd_onpolicy.sampling.speculative import reference_speculative_generate
from rlkd_onpolicy.vocab import BeyondVocabularyMask, vocabulary_size

ROWS, N_TOKENS, EOS, PAD = 64, 54, 3, 0


def padded_llama(seed: int, hidden: int = 32):
    """A tiny Llama whose output layer has ROWS rows, the last ROWS - N_TOKENS with a bias of 1e4."""
    model = tiny_llama(ROWS, hidden=hidden, seed=seed)
    head = torch.nn.Linear(hidden, ROWS, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[N_TOKENS:] = 1e4
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return padded_llama(seed=0), padded_llama(seed=1, hidden=48)


def _prompts(bsz: int = 4):
    ids = torch.randint(6, N_TOKENS, (bsz, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    return ids.masked_fill(mask == 0, PAD), mask


def test_the_bias_would_be_sampled_without_the_cut(models):
    # the premise of every other test here: with the output layer's full width, padding rows are what comes out
    student, _ = models
    ids, mask = _prompts()
    sampler = RolloutSampler("on_policy", student, None, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    out = sampler.rollout(ids, mask, generator=torch.Generator().manual_seed(0))
    assert int(out.completion_ids.max()) >= N_TOKENS


# each decode path: batched sampling and greedy (dynamic and static cache), mixed, seq_kd, speculative (both warps)
@pytest.mark.parametrize(
    "mode, options",
    [
        ("on_policy", dict(temperature=1.0)),
        ("on_policy", dict(temperature=0.0)),  # greedy
        ("on_policy", dict(temperature=1.0, cache_implementation="static")),
        ("mixed", dict(lmbda=1.0)),
        ("seq_kd", dict(teacher_temperature=0.0)),
        ("speculative", dict(skd_top_k=5, verify_on="raw")),
        ("speculative", dict(skd_top_k=5, verify_on="warped", teacher_temperature=0.0)),
    ],
)
def test_no_decode_path_emits_an_id_beyond_the_tokenizer(models, mode, options):
    student, teacher = models
    ids, mask = _prompts()
    completions = torch.full((ids.shape[0], 3), 10)
    sampler = RolloutSampler(mode, student, teacher, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
                             vocab_size=N_TOKENS, **options)  # fmt: skip
    out = sampler.rollout(ids, mask, completions, torch.ones_like(completions),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    generated = out.completion_ids[out.completion_mask[:, out.prompt_length :]]
    assert generated.numel() > 0 and int(generated.max()) < N_TOKENS


def test_the_references_cut_too(models):
    student, teacher = models
    ids, mask = _prompts(2)
    seeds = torch.tensor([1, 2])
    plain = reference_generate(student, ids, mask, seeds, stream=0, max_new_tokens=4, vocab_size=N_TOKENS)
    tokens, _, _ = reference_speculative_generate(student, teacher, ids, mask, seeds, top_k=5, max_new_tokens=4,
                                         vocab_size=N_TOKENS)  # fmt: skip
    assert int(plain.tokens.max()) < N_TOKENS and int(tokens.max()) < N_TOKENS


@pytest.mark.parametrize("mode", ["on_policy", "speculative"])
def test_trainer_rollouts_stay_inside_the_tokenizer(tmp_path, models, mode):
    from rlkd_onpolicy import RLKDConfig, RLKDTrainer

    student, teacher = models
    args = RLKDConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", max_steps=1,
                      per_device_train_batch_size=4, sampling_mode=mode, max_new_tokens=5, skd_top_k=5,
                      rank_k=3, metric_ks=[1, 3])  # fmt: skip
    trainer = RLKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=tiny_pairs(4),
                          processing_class=tiny_tokenizer())  # fmt: skip
    assert trainer.vocab_size == N_TOKENS == trainer.sampler.vocab_size
    batch = next(iter(trainer.get_train_dataloader()))
    rollout = trainer._rollout(batch)
    generated = rollout.completion_ids[rollout.completion_mask[:, rollout.prompt_length :]]
    assert generated.numel() > 0 and int(generated.max()) < N_TOKENS


def test_generate_with_the_mask_for_evaluation(models):
    student, _ = models
    ids, mask = _prompts(2)
    out = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD,
                           logits_processor=[BeyondVocabularyMask(N_TOKENS)])  # fmt: skip
    assert int(out[:, ids.shape[1] :].max()) < N_TOKENS


def test_the_cache_stores_only_tokenizer_ids(tmp_path, models):
    from rlkd_onpolicy.cache import TeacherCache, build_cache

    _, teacher = models
    build_cache(teacher, tiny_tokenizer(), tiny_pairs(3), str(tmp_path), k=8, dtype="float32", batch_size=3,
                max_length=24, max_prompt_length=12, teacher_name="padded", progress=False)  # fmt: skip
    cache = TeacherCache.open(str(tmp_path))
    assert cache.header.vocab_size == N_TOKENS
    assert all(int(cache[i]["topk_ids"].max()) < N_TOKENS for i in range(len(cache)))


def test_vocabulary_size_is_the_tokenizer_length(models):
    student, teacher = models
    assert vocabulary_size(student, teacher, tiny_tokenizer()) == N_TOKENS
    assert vocabulary_size(student, None, tiny_tokenizer()) == N_TOKENS
    with pytest.raises(ValueError, match="the tokenizer has 54 tokens but the model's output layer only 40 rows"):
        vocabulary_size(tiny_llama(40), None, tiny_tokenizer())
