"""Every YAML in configs/translation/ is a valid preset of the translation example (known keys, valid values), a
valid ablation plan of examples/translation_study.py (a base preset and variants, each checked the same way) or a
valid orderings plan (losses, each checked the same way); the orderings report pairs the runs it should."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / "configs" / "translation").glob("*.yaml"))
PLANS = [p for p in YAMLS if "variants:" in p.read_text()]
ORDERINGS = [p for p in YAMLS if "losses:" in p.read_text()]
PRESETS = [p for p in YAMLS if p not in PLANS + ORDERINGS]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example():
    return _load("distill_translation")


def test_there_are_translation_configs():
    assert PRESETS, "configs/translation/ has no preset"
    assert PLANS, "configs/translation/ has no ablation plan"
    assert ORDERINGS, "configs/translation/ has no orderings plan"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_translation_config_parses_and_names_known_methods(path):
    example = _example()
    cfg = example.parse_args(["--config", str(path)])
    methods = example.method_names(cfg)
    assert methods, path
    # every method but the SFT baseline must make a valid RLKDConfig (what main() checks before training)
    for _, mode, weight in methods:
        if mode != example.SFT_BASELINE:
            example.rlkd_config(cfg, sampling_mode=mode, rank_weight=weight, seed=cfg.seeds[0], output_dir=Path("x"))


def test_unknown_key_in_a_translation_config_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student_sft_step: 10\n")  # typo of student_sft_steps
    with pytest.raises(ValueError, match="student_sft_step"):
        _example().parse_args(["--config", str(bad)])


def test_negative_student_sft_steps_is_refused():
    with pytest.raises(ValueError, match="student_sft_steps=-1"):
        _example().parse_args(["--student-sft-steps", "-1"])


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_ablation_plan_writes_a_valid_config_per_variant(path, tmp_path):
    import yaml

    example, study = _example(), _load("translation_study")
    base_file, base, configs, output = study.ablation_plan(example, path, output=tmp_path)
    assert output == tmp_path and base.rank_weights == [0.0, 2.0]
    plan = yaml.safe_load(path.read_text())
    assert list(configs) == list(plan["variants"])
    for name, (config, changes) in configs.items():
        cfg = example.parse_args(["--config", str(config)])
        assert cfg.seeds == base.seeds and cfg.output_dir == str(config.parent), name
        for key, value in changes.items():  # the variant's change reached the settings it runs with
            assert getattr(cfg, key) == value, (name, key)
        others = {k: v for k, v in yaml.safe_load(base_file.read_text()).items() if k not in changes}
        others.pop("output_dir")
        if others.pop("rank_weights", None) is not None:  # a variant that does not set it runs RLKD's weight 2
            assert cfg.rank_weights == [2.0], name
        for key, value in others.items():  # everything else is the base's
            assert getattr(cfg, key) == value, (name, key)


def _write(tmp_path, text: str) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    return plan


def _plan(tmp_path, variants: str) -> Path:
    return _write(tmp_path, f"base: configs/translation/rlkd_table1.yaml\nvariants:\n{variants}")


def test_ablation_plan_refuses_a_bad_variant_value_naming_it(tmp_path):
    study = _load("translation_study")
    with pytest.raises(ValueError, match="'bad union'.*rank_union"):
        study.ablation_plan(_example(), _plan(tmp_path, '  "bad union": {rank_union: nearest}\n'), output=tmp_path)


def test_ablation_plan_refuses_an_unknown_variant_key(tmp_path):
    study = _load("translation_study")
    with pytest.raises(ValueError, match="rank_strength"):
        study.ablation_plan(_example(), _plan(tmp_path, "  typo: {rank_strength: 2.0}\n"), output=tmp_path)


def test_ablation_plan_refuses_other_seeds(tmp_path):
    study = _load("translation_study")
    with pytest.raises(ValueError, match="pairs runs by seed"):
        study.ablation_plan(_example(), _plan(tmp_path, "  fewer: {seeds: [0]}\n"), output=tmp_path)


def test_without_translation_the_teacher_forced_measures_are_unchanged():
    """translate_test=False (the ablations' cheaper evaluation) gives the same MOR@5 / CR@k / KL on the test pairs as
    the full evaluation, and no BLEU, chrF or KL own (nothing generated)."""
    import math

    from tiny_models import tiny_llama, tiny_tokenizer

    example = _example()
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(len(tokenizer), seed=1, sharpen=3.0)
    student = tiny_llama(len(tokenizer), seed=2)
    test = [{"src": s, "tgt": t, "ref": t} for s, t in
            [("the cat sees the dog", "le chat voit le chien"), ("one red bird", "un oiseau rouge"),
             ("the big house", "la grand maison")]]  # fmt: skip
    full_cfg = example.ExampleConfig(src="en", tgt="fr", eval_max_new_tokens=4, eval_batch_size=2)
    cheap_cfg = example.ExampleConfig(src="en", tgt="fr", eval_max_new_tokens=4, eval_batch_size=2,
                                      translate_test=False)  # fmt: skip
    full = example.evaluate(student, tokenizer, test, full_cfg, teacher=teacher, seen=test[:2])
    cheap = example.evaluate(student, tokenizer, test, cheap_cfg, teacher=teacher, seen=test[:2])
    assert {"bleu", "chrf", "kl_own", "samples"} <= set(full)
    assert not {"bleu", "chrf", "kl_own", "samples"} & set(cheap), sorted(cheap)
    for key in ("kl", "cr@1", "cr@2", "mor@5", "seen_kl", "seen_mor@5"):
        assert math.isfinite(cheap[key]) and math.isclose(cheap[key], full[key], rel_tol=1e-5, abs_tol=1e-7), key


@pytest.mark.parametrize("path", ORDERINGS, ids=lambda p: p.name)
def test_orderings_plan_writes_a_valid_config_per_loss(path, tmp_path):
    import yaml

    example, study = _example(), _load("translation_study")
    configs, output = study.orderings_plan(example, path, output=tmp_path)
    plan = yaml.safe_load(path.read_text())
    assert output == tmp_path and list(configs) == list(plan["losses"])
    seeds = set()
    for loss, config in configs.items():
        cfg = example.parse_args(["--config", str(config)])
        assert cfg.loss == loss and cfg.output_dir == str(config.parent), loss
        for key, value in (plan.get("settings") or {}).items():
            if key not in (plan["losses"][loss] or {}):
                assert getattr(cfg, key) == value, (loss, key)
        seeds.add(tuple(cfg.seeds))
    assert len(seeds) == 1 and len(next(iter(seeds))) >= 3  # paired by seed across losses, >= 3 seeds


def _orderings_plan(tmp_path, losses: str) -> Path:
    return _write(tmp_path, f"settings: {{seeds: [0, 1, 2], rank_weights: [0.0]}}\nlosses:\n{losses}")


def test_orderings_plan_refuses_other_seeds_and_a_second_sft_baseline(tmp_path):
    study = _load("translation_study")
    seeds = _orderings_plan(tmp_path, "  fkl: {}\n  jsd: {seeds: [0, 1]}\n")
    with pytest.raises(ValueError, match="'jsd' runs seeds \\[0, 1\\].*pairs runs by seed"):
        study.orderings_plan(_example(), seeds, output=tmp_path / "a")
    twice = _orderings_plan(tmp_path, "  fkl: {sampling_modes: [sft, off_policy]}\n  rkl: {sampling_modes: [sft]}\n")
    with pytest.raises(ValueError, match="'fkl', 'rkl'.*SFT baseline"):
        study.orderings_plan(_example(), twice, output=tmp_path / "b")
    bad = _orderings_plan(tmp_path, "  fkl: {sampling_modes: [on_policy], lmbda: 0.5}\n")
    with pytest.raises(ValueError, match="lmbda"):
        study.orderings_plan(_example(), bad, output=tmp_path / "c")


def test_orderings_report_pairs_each_method_with_its_baselines(tmp_path):
    """The report reads each loss's results.json (partial ones too), and every paired difference is the mean of the
    per-seed differences with a 95 % t interval; the pairs answer GKD's and SKD's questions."""
    import json

    from rlkd_onpolicy.eval.stats import paired_difference

    example, study = _example(), _load("translation_study")
    fkl = "  fkl: {sampling_modes: [sft, off_policy, on_policy, speculative]}\n"
    plan = _orderings_plan(tmp_path, fkl + "  jsd: {sampling_modes: [off_policy, on_policy]}\n")
    configs, output = study.orderings_plan(example, plan, output=tmp_path / "out")
    kl = {"sft baseline (no teacher)": [2.9, 2.8, 3.0], "off_policy fkl rank=0": [2.4, 2.5, 2.3],
          "on_policy fkl rank=0": [2.2, 2.6, 2.4], "speculative fkl rank=0": [2.1, 2.2, 2.0],
          "off_policy jsd rank=0": [2.5, 2.6, 2.4]}  # fmt: skip
    for loss, config in configs.items():
        cfg = example.parse_args(["--config", str(config)])
        dev = [{"step": 0, "mor@5": 0.3, "kl": 3.0}, {"step": 30, "mor@5": 0.4, "kl": 2.5}]
        runs = {name: [{"seed": seed, "kl": kl[name][seed], "mor@5": 0.3 + 0.01 * seed, "train_seconds": 60.0,
                        "dev": dev, "diagnostics": {"acceptance_rate": 0.4} if mode == "speculative" else {}}
                       for seed in cfg.seeds]
                for name, mode, _ in example.method_names(cfg) if name in kl}  # fmt: skip
        settings = json.loads(json.dumps(example.dataclasses.asdict(cfg)))
        partial = loss == "jsd"  # as if it had stopped before on_policy
        results = {"config": settings, "runs": runs, "rows": {"student before": {"kl": 3.0}}, "partial": partial}
        (config.parent / "results.json").write_text(json.dumps(results))
    text = study._write_orderings(example, output, configs, plan)
    assert text == (output / "orderings.md").read_text()
    assert "still running or stopped: jsd (partial)" in text and "15 runs" in text
    assert "| speculative fkl rank=0 | 0.400 |" in text  # SKD's acceptance rate, in the rollouts table
    by_row = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if " − " in line}
    for method, baseline in [("on_policy fkl rank=0", "off_policy fkl rank=0"),
                             ("speculative fkl rank=0", "on_policy fkl rank=0"),
                             ("off_policy jsd rank=0", "off_policy fkl rank=0"),
                             ("speculative fkl rank=0", "sft baseline (no teacher)")]:  # fmt: skip
        diff = paired_difference(kl[method], kl[baseline])
        cell = f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"
        assert cell in by_row[f"{method} − {baseline}"], (method, baseline, cell)
    # speculative - off-policy fkl: -0.3 [-0.55, -0.05] nats, lower KL is better
    assert "better" in by_row["speculative fkl rank=0 − off_policy fkl rank=0"].split(" | ")[3]
    assert "on_policy jsd" not in text  # not run: no row, no pair
    assert all((output / f"curves_{loss}.png").stat().st_size > 1000 for loss in ("fkl", "jsd"))


def test_a_stopped_comparison_reuses_runs_made_with_the_same_settings(tmp_path, capsys):
    import dataclasses
    import json

    example = _example()
    cfg = example.parse_args(["--sampling-mode", "off_policy", "on_policy", "--rank-weight", "0", "2"])
    config = dataclasses.asdict(cfg)
    run = {"seed": 1, "bleu": 3.5, "dev": []}
    file = tmp_path / "results.json"
    file.write_text(json.dumps({"config": config, "partial": True, "runs": {"off_policy fkl rank=0": [run]}}))
    assert example.resumable_runs(file, config) == {("off_policy fkl rank=0", 1): run}
    # which modes, rank weights and seeds run does not matter: the runs that were made are the same runs
    more = config | {"sampling_modes": ["off_policy", "speculative"], "rank_weights": [0.0], "seeds": [0, 1, 2]}
    assert example.resumable_runs(file, more) == {("off_policy fkl rank=0", 1): run}
    # any other setting does: nothing is reused, and the message names the setting
    assert example.resumable_runs(file, config | {"distill_lr": config["distill_lr"] * 2, "distill_steps": 3}) == {}
    assert "distill_lr, distill_steps" in capsys.readouterr().out
    assert example.resumable_runs(tmp_path / "absent.json", config) == {}


def test_methods_without_the_ranking_loss_train_first():
    example = _example()
    cfg = example.parse_args(["--sampling-mode", "sft", "off_policy", "on_policy", "--rank-weight", "0", "2"])
    methods = example.method_names(cfg)
    assert [name for name, _, _ in methods][:3] == ["sft baseline (no teacher)", "off_policy fkl rank=0",
                                                    "off_policy fkl rank=2"]  # tables: mode by mode
    assert [name for name, _, _ in example.run_order(methods)] == [
        "sft baseline (no teacher)", "off_policy fkl rank=0", "on_policy fkl rank=0",
        "off_policy fkl rank=2", "on_policy fkl rank=2"]  # fmt: skip
