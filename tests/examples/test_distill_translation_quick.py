"""The translation example end to end with its --quick preset: real Bible verses, the embedded SmolLM2 teacher
(briefly fine-tuned), a student pruned from it in width, RLKDTrainer, sacrebleu. About 5 minutes on 2 CPU cores."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_preset_distils_the_student_towards_the_teacher(tmp_path):
    out, artifacts = tmp_path / "run", tmp_path / "artifacts"
    command = [sys.executable, str(ROOT / "examples" / "distill_translation.py"), "--quick",
               "--output-dir", str(out), "--artifacts-dir", str(artifacts), "--student-sft-steps", "2",
               "--sampling-mode", "on_policy", "sft", "--seen-eval-limit", "4"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    before = rows["student before"]
    baseline = rows["sft baseline (no teacher)"]
    after = [row for name, row in rows.items()
             if name not in ("student before", "sft baseline (no teacher)") and not name.startswith("teacher")]
    assert after, f"no distilled student in {list(rows)}"
    # on_policy with rank weights 0 and 2 (the preset's), and the SFT baseline without a teacher
    assert {"on_policy fkl rank=0", "on_policy fkl rank=2", "sft baseline (no teacher)"} <= set(rows), list(rows)
    for row in [before, baseline, *after, rows[next(n for n in rows if n.startswith("teacher"))]]:
        assert isinstance(row["bleu"], float) and 0.0 <= row["bleu"] <= 100.0
        assert isinstance(row["chrf"], float) and 0.0 <= row["chrf"] <= 100.0
    for row in after:
        assert math.isfinite(row["kl"]) and row["kl"] < before["kl"], (row["kl"], before["kl"])
    assert math.isfinite(baseline["kl"])
    # RLKD Table 1's seen-data view: teacher-forced metrics on 4 of the pairs the methods trained on
    for row in [before, baseline, *after]:
        assert math.isfinite(row["seen_kl"]) and 0.0 <= row["seen_mor@5"] <= 1.0, row
        assert {"seen_cr@1", "seen_cr@2", "seen_spearman@5"} <= set(row), sorted(row)
    assert "seen MOR@5 %" in (out / "results.md").read_text()
    # the KL on each student's own translations (the on-policy view) is reported too
    assert all(math.isfinite(row["kl_own"]) and row["kl_own"] >= 0.0 for row in [before, baseline, *after])
    assert (out / "results.md").read_text().count("|") > 20
    assert (out / "curves.png").stat().st_size > 1000
    assert any(artifacts.iterdir())  # the fine-tuned teacher is kept for the next run
    # the student was fine-tuned before distillation (GKD's recipe): two logged, finite SFT losses
    student_sft = results["student_sft"]
    assert [step for step, _ in student_sft["loss"]] == [1, 2], student_sft["loss"]
    assert all(math.isfinite(loss) for _, loss in student_sft["loss"])
    # the distilled student (first seed of each method) is saved and loads as a translator, prompted as trained
    saved = out / "students" / "on_policy-fkl-rank-0"
    assert (saved / "translation.json").is_file() and (saved / "config.json").is_file(), sorted(out.iterdir())
    from rlkd_onpolicy.eval import load_translator

    translate = load_translator(saved, max_new_tokens=12)
    settings = json.loads((saved / "translation.json").read_text())
    verse = {"fr": "Au commencement était la Parole.", "en": "In the beginning was the Word."}[settings["src"]]
    text = translate(verse)
    assert isinstance(text, str) and text.strip(), repr(text)
    config = json.loads((saved / "config.json").read_text())
    # the preset's student is the teacher pruned in width (MLP 128 of 1536, one key/value group of 3), all 30 layers
    assert (config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (128, 3, 1)
    assert config["num_hidden_layers"] == 30 and results["config"]["student_pruning"] == "width"
    # run again, the same command: every run is reused from results.json (a stopped comparison resumes), none trains
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "[distill]" not in again.stdout, again.stdout[-3000:]
    assert again.stdout.count("[resume]") == sum(len(seed_runs) for seed_runs in results["runs"].values()) == 3
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
