"""bench/fidelity.py --pareto's report: paired-by-seed margins between methods, and
--report merging studies that evaluated the same calibrated schedules on other seeds.
Hand-made results (the study itself takes most of an hour)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from skipdit_fast.cache.schedule import CacheSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fid():
    spec = importlib.util.spec_from_file_location("fidelity_bench", os.path.join(ROOT, "bench", "fidelity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(method, setting, seed, psnr, speedup=2.0):
    return {"method": method, "model": "m", "setting": setting, "seed": seed, "speedup_cpu": speedup,
            "speedup_wall": speedup, "block_ratio": speedup, "psnr": psnr, "ssim": 0.9, "accuracy": 0.5, "fd": 1.0}


def test_paired_margin_verdicts(fid):
    base = [30.0, 25.0, 28.0, 33.0]   # most of the spread is the seed's, shared by both
    a = [run("a", "x", s, p + 1.0 + 0.05 * (-1) ** s) for s, p in enumerate(base)]
    b = [run("b", "y", s, p) for s, p in enumerate(base)]
    g = fid.paired_margin(a + b, ("a", "x"), ("b", "y"))
    assert g["seeds"] == 4 and g["mean"] == pytest.approx(1.0) and g["verdict"] == "higher"
    assert 0 < g["ci95"] < 0.2 and g["ci95"] == pytest.approx(fid.t95(3) * g["sem"])
    assert fid.paired_margin(a + b, ("b", "y"), ("a", "x"))["verdict"] == "lower"
    noisy = [run("c", "z", s, p + (1.0 if s % 2 else -0.9)) for s, p in enumerate(base)]
    assert fid.paired_margin(noisy + b, ("c", "z"), ("b", "y"))["verdict"] == "tie within noise"
    same = [run("d", "w", s, p) for s, p in enumerate(base)]
    assert fid.paired_margin(same + b, ("d", "w"), ("b", "y"))["verdict"] == "equal (the same samples)"
    # only the common seeds pair; one is not enough for an interval
    g = fid.paired_margin(a[:1] + b, ("a", "x"), ("b", "y"))
    assert g["seeds"] == 1 and g["verdict"] == "not enough seeds" and "ci95" not in g


def test_level_margins_take_the_best_other_method_at_each_level(fid):
    runs = []
    for s in range(3):
        runs += [run("m+calibrated", "t=2", s, 30 + s, 2.1), run("m+fora", "N=3", s, 29 + s + 0.1 * s, 2.2),
                 run("m+fora", "N=2", s, 33 + s, 1.6), run("m+skipcache", "N=2", s, 31 + s, 1.7)]
    table = fid.pareto_table(fid.pareto_points(runs), levels=(1.5, 2.0, 3.0))
    got = fid.level_margins(runs, table)
    assert [g["speedup"] for g in got] == [1.5, 2.0]    # nothing reaches 3x
    assert (got[0]["other"], got[0]["other_setting"]) == ("m+fora", "N=2") and got[0]["verdict"] == "lower"
    assert (got[1]["other"], got[1]["other_setting"]) == ("m+fora", "N=3")
    assert got[1]["mean"] == pytest.approx(1 - 0.1)
    assert "2.00x: +0.90" in fid.margins_text(got)


def study(seeds, code="FRFR", runs=None):
    sched = CacheSchedule.from_code(code, 4, None, meta={"predicted_error": 0.5})
    return {"settings": {"kind": "image-pareto", "models": ["a", "b"], "what": ["DiT", "Skip-DiT"],
                         "unit": "blocks", "steps": 4, "sampler": "ddpm", "samples": 10, "seeds": list(seeds),
                         "repeats": 2, "threads": 2,
                         "calibration": {"seed": 1000, "rollouts": 4, "time_batch": 10, "targets": [2.0],
                                         "retime": 0, "overshoot": 0.05, "validate_seeds": []}},
            "machine_start": {"cpus": 2, "cpu_model": "cpu", "load_average": [1, 1, 1]},
            "machine_end": {"cpus": 2, "load_average": [2, 2, 2]}, "torch": "x",
            "baselines": {f"b seed={s}": {"accuracy": 0.5, "fd": 1.0, "cpu_s": 1.0} for s in seeds},
            "runs": runs if runs is not None else
            [r for s in seeds for r in (run("b+calibrated", "target=2.0x", s, 30 + s, 2.05),
                                        run("b+fora", "N=2", s, 29 + s, 2.01))],
            "schedules": {"2.0": sched.to_dict()}, "calibration_wall_s": 1.0, "calibration_cpu_s": 1.0}


def test_report_merges_seeds_and_writes_the_margins(fid, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(study([0, 1, 2])))
    b.write_text(json.dumps(study([3, 4])))
    assert fid.main(["--pareto", "--report", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert res["settings"]["seeds"] == [0, 1, 2, 3, 4] and len(res["runs"]) == 10
    assert len(res["baselines"]) == 5 and res["machine_end"]["load_average"] == [2, 2, 2]
    assert res["merged_from"] == [str(a), str(b)]
    assert res["margins_cpu"][0]["seeds"] == 5 and res["margins_cpu"][0]["verdict"] == "higher"
    md = (tmp_path / "out" / "PARETO.md").read_text()
    assert "merged with --report" in md and "2.00x: +1.00 +- 0.00 dB against b+fora N=2 (higher)" in md
    # one file: its own folder by default
    assert fid.main(["--pareto", "--report", str(a)]) == 0
    assert (tmp_path / "PARETO.md").exists()


@pytest.mark.parametrize("change, match", [
    (lambda d: d["settings"].update(steps=8), "settings steps=8"),
    (lambda d: d.update(schedules=study([], code="FFRR")["schedules"]), "other calibrated schedules"),
    (lambda d: d["settings"].update(seeds=[2, 3]), r"seeds \[2\] are in"),
    (lambda d: d.pop("runs"), "not a bench/fidelity.py --pareto result"),
])
def test_report_refuses_what_does_not_merge(fid, tmp_path, capsys, change, match):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(study([0, 1, 2])))
    d = study([5, 6])
    change(d)
    b.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        fid.merge_pareto([str(a), str(b)])
    assert fid.main(["--pareto", "--report", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "error: --report" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_report_of_a_file_that_is_not_json(fid, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*x.json"):
        fid.merge_pareto([str(bad)])
    with pytest.raises(SystemExit):
        fid.main(["--report", str(bad)])   # --report without --pareto


def test_calibration_is_written_before_the_evaluation_and_reruns_from_it(fid, tmp_path, monkeypatch):
    """A study killed during its evaluation (most of an hour after a long calibration)
    leaves calibrated.json, and --schedules takes it instead of calibrating again."""
    quick = ["--pareto", "--quick", "--retime", "0", "--validate-seeds", "--out", str(tmp_path)]

    def killed(*a, **k):
        raise KeyboardInterrupt

    configs = fid.pareto_configs
    monkeypatch.setattr(fid, "pareto_configs", killed)
    with pytest.raises(KeyboardInterrupt):
        fid.main(quick)
    cal = json.loads((tmp_path / "calibrated.json").read_text())
    assert not (tmp_path / "pareto.json").exists() and list(cal["schedules"]) == ["2.0"]
    sched = CacheSchedule.from_dict(cal["schedules"]["2.0"])
    assert sched.steps == 10 and cal["calibration_cpu_s"] > 0

    def searched(*a, **k):
        raise AssertionError("calibrated again")

    import skipdit_fast.analysis.calibrate as calibrate
    monkeypatch.setattr(calibrate, "measure_errors", searched)
    monkeypatch.setattr(fid, "pareto_configs",   # the calibrated schedule only
                        lambda *a: [c for c in configs(*a) if c[0].endswith("+calibrated")])
    out = tmp_path / "again"
    assert fid.main(quick[:-1] + [str(out), "--schedules", str(tmp_path / "calibrated.json")]) == 0
    res = json.loads((out / "pareto.json").read_text())
    assert res["schedules"] == cal["schedules"] and not (out / "calibrated.json").exists()
    assert res["settings"]["calibration"]["from"] == str(tmp_path / "calibrated.json")
    assert res["calibration_cpu_s"] == cal["calibration_cpu_s"]
    assert [r["setting"] for r in res["runs"]] == ["target=2.0x"]
