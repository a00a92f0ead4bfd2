"""bench/study.py's own logic, without training: the paired statistics and the selection of
each arm's grid point from its sweep's results (the study itself: `python bench/study.py --smoke`)."""

import json

import pytest
import study  # bench/study.py (pytest's pythonpath)


@pytest.mark.parametrize("df, t", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262)])
def test_t_test_matches_the_tables_5_percent_points(df, t):
    assert study.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)


def test_paired_differences_counts_and_sign_test():
    p = study.paired({0: 0.8, 1: 0.7, 2: 0.9, 3: 0.6}, {0: 0.7, 1: 0.7, 2: 0.8, 3: 0.5, 9: 0.1}, higher_better=True)
    assert p["seeds"] == [0, 1, 2, 3] and (p["better"], p["worse"], p["ties"]) == (3, 0, 1)
    assert p["sign_p"] == 0.25 and p["mean"] == pytest.approx(0.075)
    loss = study.paired({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5}, higher_better=False)
    assert (loss["better"], loss["worse"], loss["t_p"]) == (2, 0, 0.0)  # lower is better; no spread
    assert study.sign_test_p(5, 0) == 0.0625  # 5 seeds can never reach p < 0.05 by signs alone


def test_selection_needs_every_seed_and_breaks_ties_by_eval_loss(tmp_path):
    d = study.DATASETS["polarity_n64"]
    test = tmp_path / "test.csv"
    plan = study.Plan(tmp_path, tmp_path / "results", smoke=False, grace_period=120, inputs={d.name: ([], test)})
    sweep, _ = plan.sweep(d, "sweep", "full")
    points = [
        {"params": {"pace.lam": lam, "pace.sigma": "1"}, "n": n, "mean": mean, "std": 0.0}
        for lam, n, mean in (("0.05", 2, 0.8), ("0.2", 2, 0.8), ("1", 1, 0.9))
    ]  # λ=1 lost a seed
    sweep.sweep_dir.mkdir(parents=True)
    (sweep.sweep_dir / "sweep.json").write_text(json.dumps({"grid": {"train.seed": ["0", "1"]}, "points": points}))
    for lam, loss in (("0.05", 0.6), ("0.2", 0.5)):
        for seed in "01":
            run = sweep.run_dir({"pace.lam": lam, "pace.sigma": "1", "train.seed": seed})
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text(json.dumps({"step": 9, "eval_loss": loss, "eval_accuracy": 0.8}))
    assert plan.selected(d, "full") == {"pace.lam": "0.2", "pace.sigma": "1"}
    final, cmd = plan.sweep(d, "final", "full")
    assert final.grid == {"pace.lam": ["0.2"], "pace.sigma": ["1"], "train.seed": ["100", "101", "102", "103", "104"]}
    assert f"data.eval={test}" in cmd
    assert cmd[cmd.index("--grid") + 1 : cmd.index("--seeds")] == ["pace.lam=0.2", "pace.sigma=1"]


def test_the_overall_table_keeps_the_datasets_an_earlier_run_wrote(tmp_path):
    d = study.DATASETS["polarity_n64"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "study_fashion.md").write_text(
        "<!-- header -->\n`python bench/study.py --only fashion`\n\nfashion table\n"
    )
    plan = study.Plan(tmp_path, results, smoke=False, grace_period=120, inputs={d.name: ([], tmp_path / "t.csv")})
    text = study.write_tables(plan, [d], "python bench/study.py --only polarity_n64")
    overall = (results / "study.md").read_text()
    assert "### polarity_n64" in text and "fashion table" in text and "--only fashion" in overall
    assert overall.index("polarity_n64") < overall.index("fashion table")  # DATASETS order
    assert json.loads((results / "study.json").read_text())["datasets"] == ["polarity_n64", "fashion"]


def test_progress_counts_only_this_runs_datasets(tmp_path):
    """A later `--only` run shares OUT with the earlier ones: their runs are not its progress."""
    for name, status in (
        ("polarity_n64", "done"),
        ("fashion", "done"),
        ("polarity_n256", "done"),
        ("polarity_n256", "stopped"),
    ):
        run = tmp_path / name / "sweep-full" / "runs" / f"run-{len(list(tmp_path.glob('*/*/runs/*')))}"
        run.mkdir(parents=True)
        (run / "run_status.json").write_text(json.dumps({"status": status}))
    plan = study.Plan(tmp_path, tmp_path / "results", smoke=False, grace_period=120)
    assert study.Study(plan, [study.DATASETS["polarity_n256"]], jobs=2).runs_done() == 1


def test_forms_study_arms_tables_and_metrics(tmp_path):
    """The causal-LM study's arms reach launch/sweep.py as overrides + grid; a final run's
    metrics (held-out loss at the end and its minimum, gap, gradient numbers, probes) reach
    both tables, with Δ against LoRA on the same seed."""
    d = study.DATASETS["smollm2_gsm_forms"]
    assert [a.name for a in d.arms] == [
        "lora", "neftune", "noise", "full_centred", "full_kl", "fast_centred", "fast_kl"
    ]  # fmt: skip
    plan = study.Plan(tmp_path, tmp_path / "results", smoke=False, grace_period=120, inputs={d.name: ([], "t.jsonl")})
    _, cmd = plan.sweep(d, "sweep", "fast_kl")
    assert "pace.consistency=kl" in cmd and "pace.mode=fast" in cmd
    assert cmd[cmd.index("--grid") + 1 : cmd.index("--seeds")] == ["pace.lam=2,20,200"]
    for arm, lam_key, loss in (("lora", "pace.mode", 1.0), ("full_centred", "pace.lam", 0.9)):
        sweep, _ = plan.sweep(d, "sweep", arm)
        value = d.arm(arm).grid[lam_key][0]
        sweep.sweep_dir.mkdir(parents=True)
        point = {"params": {lam_key: value}, "n": 1, "mean": loss, "std": 0.0}
        (sweep.sweep_dir / "sweep.json").write_text(json.dumps({"grid": {"train.seed": ["0"]}, "points": [point]}))
        sweep.run_dir({lam_key: value, "train.seed": "0"}).mkdir(parents=True)
        (sweep.run_dir({lam_key: value, "train.seed": "0"}) / "metrics.jsonl").write_text(
            json.dumps({"eval_loss": loss})
        )
        final, _ = plan.sweep(d, "final", arm)
        for seed in d.final_seeds:
            run = final.run_dir({lam_key: value, "train.seed": str(seed)})
            run.mkdir(parents=True)
            rows = [{"step": s, "task_loss": 0.5, "grad_norm": 1.0} for s in range(1, 7)]
            rows[2]["eval_loss"], rows[5]["eval_loss"] = loss, loss + 0.2  # its minimum, then a rise
            (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
            (run / "run_status.json").write_text('{"status": "done"}')
            probe = {"polarity_nll": 5.0 + loss, "kl_to_base": 0.1, "fp_distance": 0.2, "base_polarity_nll": 5.0}
            (run / "probe.json").write_text(json.dumps(probe))
    results = study.final_results(plan, d, "full_centred")
    assert results[100]["eval_loss"] == 1.1 and results[100]["eval_loss_min"] == 0.9
    assert results[100]["gap"] == 1.1 - 0.5 and results[100]["polarity_nll"] == 5.9
    _, table = study.summarize(plan, d)
    overview, against = table.split("**Against lora")
    assert "| full_centred | lam=0.3 | 0.9 ± 0 | 3 | 1.1 ± 0 | 0.9 ± 0 |" in overview
    assert "| full_centred | -0.1 ± 0 [3/0/0, 0] | -0.1 ± 0 [3/0/0, 0] |" in against


def test_fast_short_runs_compares_fast_with_full_per_epoch(tmp_path):
    """bench/fast_short_runs.py: per epoch, fast's mean logged consistency over full's at the same
    form and λ (epoch 1: fast has no target yet, so its ratio is 0)."""
    import fast_short_runs

    base = tmp_path / "study" / "smollm2_gsm_forms"
    for mode, values in (("full", [1.0, 1.0, 2.0, 2.0]), ("fast", [0.0, 0.0, 10.0, 30.0])):
        run = base / f"sweep-{mode}_centred" / "runs" / "pace.lam=3,train.seed=0"
        run.mkdir(parents=True)
        rows = [{"step": i + 1, "epoch": (i + 1) / 2, "consistency_loss": v} for i, v in enumerate(values)]
        rows.append({"step": 4, "eval_loss": 1.0 if mode == "full" else 1.2})
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
        (run / "run_status.json").write_text('{"status": "done"}')
    assert fast_short_runs.main(["--out-dir", str(tmp_path / "study"), "--results", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "fast_short_runs.json").read_text())["runs"]
    assert runs["centred_mse λ=3"]["ratio"] == {"1": 0.0, "2": 10.0}
    assert runs["centred_mse λ=3"]["eval"] == [1.0, 1.2]
