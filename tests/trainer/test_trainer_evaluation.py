"""evaluate() returns the distillation metrics, and `compute_metrics` gets what transformers' Trainer gives it."""

import numpy as np
import torch
from tiny_models import tiny_llama, tiny_pairs, tiny_tokenizer

from rlkd_onpolicy import RLKDConfig, RLKDTrainer
from rlkd_onpolicy.data import tokenize_example

METRICS = ("eval_loss", "eval_kd_loss", "eval_rank_loss", "eval_cr@1", "eval_mor@5", "eval_completion_tokens")


def _trainer(tmp_path, eval_dataset=None, **overrides) -> RLKDTrainer:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=3, learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                sampling_mode="on_policy", max_new_tokens=5, rank_k=3, metric_ks=[1, 5], disable_tqdm=True)
    hooks = {name: overrides.pop(name) for name in ("compute_metrics", "preprocess_logits_for_metrics")
             if name in overrides}
    base.update(overrides)
    return RLKDTrainer(model=tiny_llama(64, seed=2), teacher_model=tiny_llama(64, hidden=48, seed=1, sharpen=4.0),
                       args=RLKDConfig(**base), train_dataset=tiny_pairs(12),
                       eval_dataset=tiny_pairs(6, seed=1) if eval_dataset is None else eval_dataset,
                       processing_class=tiny_tokenizer(), **hooks)


def test_evaluate_returns_every_metric_and_the_best_model_can_be_chosen_by_one(tmp_path):
    """Issue 15, defect 2: evaluate() returned only eval_loss (the other metrics reached log_history only), so
    metric_for_best_model="eval_mor@5" raised KeyError at the first evaluation."""
    trainer = _trainer(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                       load_best_model_at_end=True, metric_for_best_model="eval_mor@5", greater_is_better=True,
                       logging_steps=2, nonfinite_policy="skip")
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 3
    # an evaluation between two training logs keeps the training metrics out of its entry, and in theirs
    assert not any(key in e for e in evals for key in ("kd_loss", "mor@5", "nonfinite_skipped_steps"))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [2] and "kd_loss" in logged[0] and "mor@5" in logged[0]
    assert trainer.state.best_metric == max(e["eval_mor@5"] for e in evals)
    best_step = max(evals, key=lambda e: e["eval_mor@5"])["step"]  # the first of equal values wins, as max does
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    metrics = trainer.evaluate()
    for key in METRICS:
        assert key in metrics, key
    assert trainer.state.log_history[-1]["eval_mor@5"] == metrics["eval_mor@5"]  # logged and returned alike
    assert 0.0 <= metrics["eval_mor@5"] <= 1.0 and metrics["eval_completion_tokens"] > 0


def test_the_metrics_follow_the_metric_key_prefix(tmp_path):
    """Trainer names evaluation metrics by `metric_key_prefix` (dev_loss); ours follow it instead of a fixed eval_."""
    metrics = _trainer(tmp_path).evaluate(metric_key_prefix="dev")
    for key in METRICS:
        assert key.replace("eval_", "dev_") in metrics, key
    assert not any(key.startswith("eval_") for key in metrics)


def test_compute_metrics_gets_the_students_logits_and_the_completion_labels(tmp_path):
    """Issue 15, defect 2: a `compute_metrics` passed to the trainer was never called. It must get what Trainer gives
    it for a causal LM (predictions = the student's logits on the evaluated sequence, label_ids = its tokens with
    -100 outside the completion, unshifted), and its result must be returned with the eval_ prefix."""
    seen = {}

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen["logits"], seen["labels"] = logits, labels
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # position t predicts token t + 1
        counted = target != -100
        return {"token_accuracy": float((predicted == target)[counted].mean())}

    dataset = tiny_pairs(6, seed=1)
    # one example per batch: no padding inside a batch, so each row can be recomputed on its own below
    trainer = _trainer(tmp_path, eval_dataset=dataset, sampling_mode="off_policy", compute_metrics=compute_metrics,
                       per_device_eval_batch_size=1)
    metrics = trainer.evaluate()
    assert "eval_token_accuracy" in metrics and "eval_mor@5" in metrics
    logits, labels = seen["logits"], seen["labels"]
    tokenizer = tiny_tokenizer()
    assert logits.shape[:2] == labels.shape and labels.shape[0] == 6 and logits.shape[-1] == len(tokenizer)
    student = trainer.model.eval()
    for row, example in enumerate(dataset):
        tokenized = tokenize_example(tokenizer, example, max_length=1024, max_prompt_length=512)
        # off_policy evaluates the dataset's completions: the labels are exactly those tokens, after the prompt
        n = len(tokenized.input_ids)
        assert labels[row, : tokenized.completion_start].tolist() == [-100] * tokenized.completion_start
        assert labels[row, tokenized.completion_start : n].tolist() == tokenized.completion_ids
        assert (labels[row, n:] == -100).all()  # Trainer's padding across batches
        # and the predictions are the student's logits on that sequence, cut to the tokenizer's vocabulary
        with torch.no_grad():
            own = student(input_ids=torch.tensor([tokenized.input_ids])).logits[0, :, : len(tokenizer)].numpy()
        np.testing.assert_allclose(logits[row, :n], own, rtol=1e-5, atol=1e-5)
    accuracy = np.mean([p == t for r in range(6) for p, t in zip(logits[r, :-1].argmax(-1), labels[r, 1:],
                                                                  strict=True) if t != -100])
    assert metrics["eval_token_accuracy"] == float(accuracy)


def test_preprocess_logits_for_metrics_is_applied(tmp_path):
    """As in Trainer (and TRL's GKDTrainer), preprocess_logits_for_metrics shrinks the logits before they are kept."""
    got = {}

    def preprocess(logits, labels):
        return logits.argmax(-1)

    def compute_metrics(prediction):
        got["shape"] = prediction.predictions.shape
        return {}

    trainer = _trainer(tmp_path, compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess)
    trainer.evaluate()
    assert len(got["shape"]) == 2  # (examples, T): token ids, not (examples, T, V) logits
