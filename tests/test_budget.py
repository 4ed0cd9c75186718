"""Accuracy at any budget: time-budget planning, the demo's proportional schedules and its
figures, `bench e2e` curves of several runs on one plot."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ucseg_fast.cli import main
from ucseg_fast.config import load_config, phase2_start_at
from ucseg_fast.train.budget import VAL_SHARE, BudgetError, plan_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from ucseg_fast.data.synthetic import write_synthetic_acdc
    return write_synthetic_acdc(tmp_path_factory.mktemp("acdc"), n_train_patients=4,
                                slices_per_volume=4, n_val=1, n_test=0, size=(48, 48), seed=1)


def tiny(root, out, *extra):
    return ["--config", "demo", f"--data.root='{root}'",
            "--data.img_size=[32,32]", "--data.labeled_bs=1", "--data.unlabeled_bs=1",
            "--data.labeled_patients=3", "--loss.queue_size=16", "--train.max_val_volumes=1",
            "--train.progress=false", f"--train.out_dir='{out}'", *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- planning
def test_plan_fills_the_budget_with_steps_and_a_bounded_share_of_validation():
    cfg = load_config("demo")
    probe = {"build_s": 5.0, "step1_s": 0.1, "step2_s": 0.2, "val_s": 2.0}
    new, plan = plan_run(cfg, 600.0, probe, elapsed_s=15.0)
    T, f2 = plan["max_iterations"], 1 - 12000 / 50000
    assert plan["phase2_fraction"] == pytest.approx(f2)
    step = (1 - f2) * 0.1 + f2 * 0.2
    avail = 600 * 0.97 - 15 - 5
    # validations take about VAL_SHARE of what is left; the steps take the rest
    assert plan["validations"] * 2.0 <= VAL_SHARE * avail + 2.0
    assert T * step + plan["validations"] * 2.0 <= avail + 2.0
    assert T * step + plan["validations"] * 2.0 >= avail - step - 2.0
    tc = new.train
    assert (tc.max_iterations, tc.val_every) == (T, plan["val_every"])
    assert tc.log_every <= tc.val_every and tc.checkpoint_every == T
    assert new.loss.schedules == "proportional"
    assert phase2_start_at(new) == round(0.24 * T)


def test_plan_of_the_supervised_baseline_has_no_phase_2():
    cfg = load_config("demo", ["--loss.semi_supervised=false"])
    _, plan = plan_run(cfg, 60.0, {"build_s": 1.0, "step1_s": 0.1, "step2_s": 9.0,
                                   "val_s": 0.5}, elapsed_s=3.0)
    assert plan["phase2_fraction"] == 0.0 and plan["step_s"] == 0.1


def test_a_budget_too_small_is_one_line_naming_the_times():
    cfg = load_config("demo")
    with pytest.raises(BudgetError) as e:
        plan_run(cfg, 10.0, {"build_s": 4.0, "step1_s": 1.0, "step2_s": 1.0, "val_s": 5.0},
                 elapsed_s=6.0)
    msg = str(e.value)
    assert "\n" not in msg and "validation 5.0 s" in msg and "--train.max_val_volumes" in msg


def test_demo_preset_trains_the_whole_method():
    cfg = load_config("demo")
    from ucseg_fast.train.schedules import ScheduleTensors
    T = cfg.train.max_iterations
    assert cfg.loss.schedules == "proportional" and T == 300
    assert phase2_start_at(cfg) == 72
    st = ScheduleTensors("cpu", T=T, T_ref=cfg.loss.reference_iterations)
    assert st.full_weight_at() == 180 and st.values(180)["w"] == 15.0


# ------------------------------------------------------------------------------- running
def test_time_budget_stops_a_tiny_run_within_10_percent(root, tmp_path, capsys):
    budget_min = 0.5
    out = tmp_path / "timed"
    t0 = time.perf_counter()
    assert main(["train", *tiny(root, out), "--time-budget", str(budget_min)]) == 0
    elapsed = time.perf_counter() - t0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert abs(elapsed - 60 * budget_min) <= 0.1 * 60 * budget_min, (elapsed, summary["plan"])
    assert summary["plan"]["max_iterations"] >= 2 and summary["iterations"] >= 2
    # the length was planned again from the run's own phase-1 steps, before copy-paste
    plan = summary["plan"]
    assert 0 < plan["replanned_at"] < phase2_start_at(load_config(None, [
        f"--train.max_iterations={plan['max_iterations']}", "--loss.schedules=proportional"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_iterations"] == plan["max_iterations"]
    assert 0 < summary["val_share"] < 1 and summary["val_s"] > 0
    log = rows(out)
    steps = [r for r in log if "L" in r]
    vals = [r for r in log if "val_dice" in r]
    assert {"w", "au_lambda", "gate_thr", "phase", "lr"} <= set(steps[0])
    assert {r["phase"] for r in steps} == {1, 2}  # the proportional switch inside the run
    assert [r["wall_s"] for r in vals] == sorted(r["wall_s"] for r in vals)
    assert all(r["val_s"] <= r["wall_s"] for r in vals)


def test_time_budget_option_errors(root, tmp_path, capsys):
    for argv, needle in ((["--time-budget", "0"], "--time-budget 0.0 must be > 0"),
                         (["--time-budget", "1", "--stop-at", "3"], "does not combine")):
        assert main(["train", *tiny(root, tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err


def test_bench_e2e_plots_several_runs_on_one_figure(root, tmp_path, capsys):
    runs = []
    for name, extra in (("ssl", []), ("supervised", ["--loss.semi_supervised=false"])):
        out = tmp_path / name
        assert main(["train", *tiny(root, out, "--train.max_iterations=4", "--train.val_every=2",
                                    "--train.log_every=2", *extra)]) == 0
        runs.append(out)
    sup = rows(tmp_path / "supervised")
    assert all(r["phase"] == 1 for r in sup if "L" in r)  # no copy-paste phase
    assert not any(k.endswith(("_u", "_m")) or k.startswith(("ic", "ife"))
                   for r in sup for k in r)  # no unlabeled term logged
    capsys.readouterr()
    plot = tmp_path / "plot"
    assert main(["bench", "e2e", "--out", str(plot), *[a for r in runs for a in ("--run", str(r))]]) == 0
    text = capsys.readouterr().out
    assert "ssl: 3 validations" in text and "supervised: 3 validations" in text
    saved = json.loads((plot / "dice_vs_time.json").read_text())
    assert set(saved["runs"]) == {"ssl", "supervised"}
    assert (plot / "dice_vs_time.png").stat().st_size > 1000
    assert main(["bench", "e2e", "--out", str(plot), "--run", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_demo_ends_with_its_figures(tmp_path, monkeypatch, capsys):
    # the demo works in the current directory: its synthetic set in runs/synthetic_acdc
    # (written here smaller than the demo's own), its run in runs/demo
    from ucseg_fast.data.synthetic import write_synthetic_acdc
    write_synthetic_acdc(tmp_path / "runs" / "synthetic_acdc", n_train_patients=4,
                         slices_per_volume=4, n_val=1, n_test=0, size=(48, 48), seed=2)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--data.img_size=[32,32]", "--data.labeled_bs=1",
                 "--data.unlabeled_bs=1", "--data.labeled_patients=3", "--loss.queue_size=16",
                 "--train.max_iterations=4", "--train.val_every=2", "--train.log_every=2",
                 "--train.max_val_volumes=1", "--train.progress=false"]) == 0
    text = capsys.readouterr().out
    out = tmp_path / "runs" / "demo"
    for png in ("demo_predictions.png", "dice_vs_time.png"):
        assert (out / png).stat().st_size > 1000 and f"runs/demo/{png}" in text
