"""Caching fidelity study on the shipped tiny models (skipdit_fast/weights/).

    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py [--out bench/results/fidelity-cpu] [--quick]

(OMP_WAIT_POLICY=PASSIVE: on a shared machine, OpenMP threads that spin while waiting
make every op several times slower; it must be set before torch is imported.)

Question: at the same speedup, do Skip-DiT's cached samples stay closer to its own
uncached samples than a vanilla DiT's cached samples stay to the DiT's? For interval
N = 2..6 (and branch K for the split caches), from the same seed (same initial noise
and DDPM noise) as the uncached run of the same model:

  skipdit+skipcache  Skip-DiT, Skip-Cache (N, K): cached steps run blocks 0..K-1 and
                     depth-K..depth-1, the deep output cached (skipdit_fast.cache)
  dit+fora           vanilla DiT, FORA-style static cache: every block's attention
                     and MLP outputs reused for N-1 steps (skipdit_fast.baselines)
  dit+split          vanilla DiT, the same shallow/deep split as Skip-Cache, without
                     long skips (SkipCache driving the vanilla DiT)
  skipdit+fora       (extra) Skip-DiT with the FORA-style cache

For each run: wall time and process CPU time (the machine is shared: CPU time is the
less load-sensitive of the two), measured speedup over the uncached run of the same
model, the ideal (block-count) speedup, PSNR and SSIM of cached vs uncached samples,
and a download-free quality score from a small digit classifier trained on the same
data (skipdit_fast/digits.py): its accuracy on the samples (does a sample of class c
look like a c) and the Frechet distance of its penultimate features to those of the
1797 real digits. Also the training curves of the two models (their logs).

Writes <out>/fidelity.json (every number), fidelity.csv, README.md (tables and what
they show), psnr_vs_speedup.png, training_curves.png and sample grids.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from skipdit_fast import SkipCache  # noqa: E402
from skipdit_fast.cache.baselines import CachedModel, ForaCache  # noqa: E402
from skipdit_fast.sampling.diffusion import sample  # noqa: E402
from skipdit_fast.data.digits import digits, to_unit  # noqa: E402
from skipdit_fast.evaluation.digits import DigitClassifier  # noqa: E402
from skipdit_fast.evaluation.metrics import frechet_distance, psnr, ssim  # noqa: E402
from skipdit_fast.apps.train import machine_info  # noqa: E402
from skipdit_fast.pretrained import MODELS, WEIGHTS_DIR, load_pretrained  # noqa: E402

METHODS = {
    "skipdit+skipcache": ("tiny-skipdit", "skipcache"),
    "dit+fora": ("tiny-dit", "fora"),
    "dit+split": ("tiny-dit", "skipcache"),
    "skipdit+fora": ("tiny-skipdit", "fora"),
}
COLORS = {"skipdit+skipcache": "tab:red", "dit+fora": "tab:blue", "dit+split": "tab:green",
          "skipdit+fora": "tab:orange"}


def timed_sample(model, labels, steps, seed, cache=None, repeats=1):
    """(result, CPU seconds): the fastest of `repeats` identical runs (wall and CPU
    time each the minimum; the samples are the same every time, the seed fixes them)."""
    best, cpu = None, math.inf
    for _ in range(max(1, repeats)):
        c0 = time.process_time()
        r = sample(model, labels, steps=steps, seed=seed, cache=cache)
        cpu = min(cpu, time.process_time() - c0)
        if best is not None:
            assert torch.equal(best.latents, r.latents), "sampling is not deterministic"
            r.seconds = min(r.seconds, best.seconds)
        best = r
    return best, cpu


def scores(clf, real_feats, x, labels) -> dict:
    return {"accuracy": clf.accuracy(x, labels), "fd": frechet_distance(clf.features(x), real_feats)}


def run_study(args) -> dict:
    torch.manual_seed(0)
    clf = DigitClassifier.load()
    real, real_y = digits(clf.size)
    real_feats = clf.features(real)
    labels = torch.arange(10).repeat(args.per_class)
    models = {name: CachedModel(load_pretrained(name)) for name in MODELS}
    out = {"settings": {"steps": args.steps, "sampler": "ddpm", "samples": len(labels), "seed": args.seed,
                        "repeats": args.repeats,
                        "intervals": args.intervals, "branches": args.branches,
                        "threads": torch.get_num_threads()},
           "machine_start": machine_info(), "torch": torch.__version__,
           "classifier": {"test_accuracy_real": clf.test_accuracy,
                          "fd_real_train_vs_test": None}, "baselines": {}, "runs": []}
    from skipdit_fast.data.digits import split
    tr, te = split(len(real))
    out["classifier"]["fd_real_train_vs_test"] = frechet_distance(clf.features(real[tr]), clf.features(real[te]))
    # the floor at this sample size: real digits, as many per class as the samples
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.cat([torch.nonzero(real_y == c)[:, 0][torch.randperm(int((real_y == c).sum()), generator=g)]
                      [:args.per_class] for c in range(10)])
    out["classifier"]["fd_real_subset"] = frechet_distance(clf.features(real[pick]), real_feats)
    out["classifier"]["accuracy_real_subset"] = clf.accuracy(real[pick], real_y[pick])

    # warm-up, then the uncached reference of each model
    for m in models.values():
        sample(m, labels[:10], steps=3, seed=args.seed)
    base = {}
    for name, m in models.items():
        r, cpu = timed_sample(m, labels, args.steps, args.seed, repeats=args.repeats + 1)
        x = r.latents
        base[name] = (r.seconds, cpu, x)
        out["baselines"][name] = {"wall_s": r.seconds, "cpu_s": cpu, **scores(clf, real_feats, x, labels)}
        print(f"{name} uncached: {r.seconds:.2f} s wall, {cpu:.2f} s CPU, "
              f"acc {out['baselines'][name]['accuracy']:.3f}, FD {out['baselines'][name]['fd']:.1f}", flush=True)
    grids = {name: to_unit(base[name][2]) for name in models}

    for method, (mname, kind) in METHODS.items():
        m = models[mname]
        for n in args.intervals:
            for k in (args.branches if kind == "skipcache" else [None]):
                cache = SkipCache(interval=n, branch=k) if kind == "skipcache" else ForaCache(n)
                r, cpu = timed_sample(m, labels, args.steps, args.seed, cache=cache, repeats=args.repeats)
                bw, bc, bx = base[mname]
                a, b = to_unit(bx), to_unit(r.latents)
                rep = r.report
                row = {"method": method, "model": mname, "N": n, "K": k,
                       "wall_s": r.seconds, "cpu_s": cpu, "speedup_wall": bw / r.seconds, "speedup_cpu": bc / cpu,
                       "ideal_speedup": rep.steps / rep.full_steps if kind == "fora" else rep.ideal_speedup,
                       "full_steps": rep.full_steps, "cached_steps": rep.cached_steps,
                       "psnr": psnr(a, b), "ssim": ssim(a, b), **scores(clf, real_feats, r.latents, labels)}
                out["runs"].append(row)
                if n == args.grid_interval and k in (None, args.grid_branch):
                    grids[f"{method} N={n}" + (f" K={k}" if k else "")] = b
                print(f"{method:18s} N={n} K={k}: speedup {row['speedup_cpu']:.2f}x CPU / "
                      f"{row['speedup_wall']:.2f}x wall (ideal {row['ideal_speedup']:.2f}x), "
                      f"PSNR {row['psnr']:.1f} dB, SSIM {row['ssim']:.3f}, acc {row['accuracy']:.3f}, "
                      f"FD {row['fd']:.1f}", flush=True)
    out["machine_end"] = machine_info()
    out["_grids"] = grids
    return out


# ---------------------------------------------------------------------------------
# analysis

def envelope(rows, key="speedup_cpu"):
    """The best PSNR reached at or above each speedup (upper-left Pareto front),
    as sorted (speedup, psnr) points."""
    pts = sorted(((r[key], r["psnr"]) for r in rows), key=lambda p: -p[0])
    front, best = [], -math.inf
    for s, p in pts:
        if p > best:
            front.append((s, p))
            best = p
    return sorted(front)


def psnr_at(front, s):
    """Best PSNR of a method at speedup >= s (None when it never gets that fast)."""
    vals = [p for sp, p in front if sp >= s]
    return max(vals) if vals else None


def compare_at_equal_speedup(runs, key="speedup_cpu", grid=(1.25, 1.5, 1.75, 2.0, 2.5, 3.0)):
    fronts = {m: envelope([r for r in runs if r["method"] == m], key) for m in METHODS}
    table = []
    for s in grid:
        table.append({"speedup": s, **{m: psnr_at(fronts[m], s) for m in METHODS}})
    return table


def training_summary(weights_dir: Path) -> dict:
    logs = {}
    for name in MODELS:
        j = json.loads((weights_dir / f"{name}.train.json").read_text())
        rows = list(csv.DictReader(open(weights_dir / f"{name}.train.csv")))
        logs[name] = {"eval": j["eval"], "loss": [float(r["loss"]) for r in rows],
                      "mse": [float(r["mse"]) for r in rows], "wall_s": j["wall_s"], "cpu_s": j["cpu_s"],
                      "steps": j["steps"]}
    ev = {n: {e["step"]: e["loss"] for e in logs[n]["eval"]} for n in logs}
    common = sorted(set(ev["tiny-dit"]) & set(ev["tiny-skipdit"]))
    later = [s for s in common if s >= 100]
    lower = sum(ev["tiny-skipdit"][s] < ev["tiny-dit"][s] for s in later)
    diff = [ev["tiny-skipdit"][s] - ev["tiny-dit"][s] for s in later]

    def first_below(name, thr):
        return next((s for s in common if ev[name][s] <= thr), None)

    final_dit = ev["tiny-dit"][common[-1]]
    thresholds = {f"{thr:.4f}": {n: first_below(n, thr) for n in MODELS}
                  for thr in (final_dit * 1.25, final_dit * 1.1, final_dit * 1.02)}
    return {"logs": logs, "eval_steps": common, "skip_lower_count": lower, "points": len(later),
            "mean_eval_diff_skip_minus_dit": float(np.mean(diff)) if diff else None,
            "final_eval": {n: ev[n][common[-1]] for n in MODELS}, "first_reaching": thresholds}


def plots(res: dict, train: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "speedup_cpu", "speedup (process CPU time)"),
                           (axes[1], "ideal_speedup", "ideal speedup (block count)")):
        for m in METHODS:
            rows = [r for r in res["runs"] if r["method"] == m]
            ax.scatter([r[key] for r in rows], [r["psnr"] for r in rows], color=COLORS[m], label=m, s=22,
                       marker="o" if m.startswith("dit") else "^")
            front = envelope(rows, key)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=COLORS[m], lw=1)
            for r in rows:
                ax.annotate(f"{r['N']}" + (f"/{r['K']}" if r["K"] else ""), (r[key], r["psnr"]),
                            fontsize=6, color=COLORS[m], xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(title)
        ax.set_ylabel("PSNR cached vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny models on digits, DDPM {res['settings']['steps']} steps, "
                 f"{res['settings']['samples']} samples; labels N/K")
    fig.tight_layout()
    p = out / "psnr_vs_speedup.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p.name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, color in (("tiny-dit", "tab:blue"), ("tiny-skipdit", "tab:red")):
        lg = train["logs"][name]
        loss = np.array(lg["loss"])
        k = 25
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        axes[0].plot(np.arange(k, len(loss) + 1), smooth, color=color, label=name)
        axes[1].plot([e["step"] for e in lg["eval"]], [e["loss"] for e in lg["eval"]], color=color,
                     marker=".", label=name)
    axes[0].set_title("training loss (MSE + VB), 25-step mean")
    axes[1].set_title("fixed-batch loss (same images, t and noise)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    p = out / "training_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p.name)
    return written


def write_grids(grids: dict, out: Path) -> list[str]:
    from skipdit_fast.apps.demo import digit_grid
    from skipdit_fast.apps.common import write_png

    names = []
    for title, img in grids.items():
        fn = "samples_" + title.replace(" ", "_").replace("=", "").replace("+", "-") + ".png"
        write_png(str(out / fn), digit_grid(img[:30], 10, scale=3))
        names.append((title, fn))
    return names


def fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def verdict(cmp) -> str:
    """Skip-DiT + Skip-Cache against the better of the two vanilla-DiT caches, at the
    speedups all three reach."""
    rows = [r for r in cmp if all(r[m] is not None for m in ("skipdit+skipcache", "dit+fora", "dit+split"))]
    if not rows:
        return "no speedup level is reached by all three methods"
    wins = [r for r in rows if r["skipdit+skipcache"] > max(r["dit+fora"], r["dit+split"])]
    margins = ", ".join(f"{r['speedup']:.2f}x: {r['skipdit+skipcache'] - max(r['dit+fora'], r['dit+split']):+.1f} dB"
                        for r in rows)
    return (f"Skip-DiT + Skip-Cache has the higher PSNR at {len(wins)} of the {len(rows)} speedup levels that all "
            f"three reach (its PSNR minus the better vanilla-DiT cache's: {margins})")


def readme(res: dict, train: dict, cmp_cpu, cmp_ideal, grid_files, out: Path) -> str:
    st = res["settings"]
    L = [f"# Caching fidelity: Skip-DiT + Skip-Cache vs vanilla DiT + FORA / split ({date.today()})", "",
         f"Generated by `bench/fidelity.py` on {res['machine_start'].get('cpu_model', '?')} "
         f"({res['machine_start']['cpus']} cores, {st['threads']} torch threads), torch {res['torch']}. "
         f"Load average at start {res['machine_start'].get('load_average')}, at end "
         f"{res['machine_end'].get('load_average')}: the machine was shared, so wall times are noisy; "
         "the speedups use process CPU time (wall speedups are in the table and fidelity.json).", "",
         f"Models: the shipped tiny DiT and Skip-DiT (skipdit_fast/weights/, same config but the long skips: "
         "depth 12, width 64, 16x16x1 digits). "
         f"Sampling: DDPM {st['steps']} steps, {st['samples']} samples ({st['samples'] // 10} per class), "
         f"seed {st['seed']}, cached and uncached runs from the same noise. PSNR / SSIM: cached vs uncached "
         "samples of the same model, on images in [0, 1]. Quality: a small CNN trained on the same digits "
         f"({100 * res['classifier']['test_accuracy_real']:.1f}% on held-out real digits): accuracy = share of "
         "samples it labels as their class (chance 10%), FD = Frechet distance of its 64 penultimate features "
         f"to the 1797 real digits' (the same for {st['samples']} real digits, {st['samples'] // 10} per class: "
         f"FD {res['classifier']['fd_real_subset']:.1f}, accuracy {res['classifier']['accuracy_real_subset']:.3f}; "
         f"real train split vs test split: FD {res['classifier']['fd_real_train_vs_test']:.1f}). "
         f"Timing: the fastest of {st['repeats']} runs per setting ({st['repeats'] + 1} for the uncached ones).", ""]
    L += ["## Uncached baselines", "", "| model | wall s | CPU s | accuracy | FD |", "| --- | --- | --- | --- | --- |"]
    for n, b in res["baselines"].items():
        L.append(f"| {n} | {b['wall_s']:.2f} | {b['cpu_s']:.2f} | {b['accuracy']:.3f} | {b['fd']:.1f} |")
    L += ["", "## PSNR at equal speedup", "",
          "Best PSNR each method reaches at a speedup of at least s (over its N, K settings; `-`: never that fast).", ""]
    for title, cmp in (("measured speedup (CPU time)", cmp_cpu), ("ideal speedup (block count)", cmp_ideal)):
        L += [f"By {title}:", "", "| s | " + " | ".join(METHODS) + " |", "| --- " * (len(METHODS) + 1) + "|"]
        for row in cmp:
            L.append(f"| {row['speedup']:.2f} | " + " | ".join(fmt(row[m], ".1f") for m in METHODS) + " |")
        L += ["", f"By {title}: {verdict(cmp)}.", ""]
    L += ["## All runs", "",
          "| method | N | K | speedup CPU | speedup wall | ideal | PSNR dB | SSIM | accuracy | FD |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        L.append(f"| {r['method']} | {r['N']} | {r['K'] or '-'} | {r['speedup_cpu']:.2f} | {r['speedup_wall']:.2f} | "
                 f"{r['ideal_speedup']:.2f} | {fmt(r['psnr'], '.1f')} | {r['ssim']:.3f} | {r['accuracy']:.3f} | "
                 f"{r['fd']:.1f} |")
    L += ["", "![PSNR vs speedup](psnr_vs_speedup.png)", ""]
    t = train
    L += ["## Training curves (equal steps, equal batches)", "",
          f"Both models: {t['logs']['tiny-dit']['steps']} steps, same seed, data order and noise. "
          f"Fixed-batch loss at the last step: DiT {t['final_eval']['tiny-dit']:.4f}, "
          f"Skip-DiT {t['final_eval']['tiny-skipdit']:.4f}. From step 100 on, Skip-DiT's fixed-batch loss is the "
          f"lower one at {t['skip_lower_count']} of {t['points']} evaluation points (mean difference Skip-DiT - DiT "
          f"{t['mean_eval_diff_skip_minus_dit']:+.4f}). First step at which the fixed-batch loss reaches "
          "a level (levels relative to DiT's final loss):", "",
          "| level | tiny-dit | tiny-skipdit |", "| --- | --- | --- |"]
    for thr, d in t["first_reaching"].items():
        L.append(f"| {thr} | {d['tiny-dit']} | {d['tiny-skipdit']} |")
    faster = t["skip_lower_count"] > t["points"] / 2 and t["mean_eval_diff_skip_minus_dit"] < 0
    L += ["", "Faster convergence with long skips on these tiny models: " +
          ("yes: Skip-DiT's fixed-batch loss is lower at most evaluation points." if faster else
           "no: Skip-DiT's fixed-batch loss is not lower at most evaluation points.") +
          " (One training run per model, one seed: a small difference may not hold for other seeds.)"]
    L += ["", "![training curves](training_curves.png)", ""]
    L += ["## Sample grids", ""]
    for title, fn in grid_files:
        L.append(f"- {title}: ![{title}]({fn})")
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity-cpu"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--branches", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--grid-interval", type=int, default=4)
    p.add_argument("--grid-branch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting, the fastest counts "
                   "(the uncached baselines: one more)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 2 per class, N = 2 3, K = 2")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.per_class, args.intervals, args.branches = 10, 2, [2, 3], [2]
        args.grid_interval = 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_study(args)
    grids = res.pop("_grids")
    train = training_summary(WEIGHTS_DIR)
    cmp_cpu = compare_at_equal_speedup(res["runs"], "speedup_cpu")
    cmp_ideal = compare_at_equal_speedup(res["runs"], "ideal_speedup")
    res["equal_speedup_cpu"], res["equal_speedup_ideal"] = cmp_cpu, cmp_ideal
    res["training"] = {k: v for k, v in train.items() if k != "logs"}
    (out / "fidelity.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    with open(out / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(res["runs"][0]))
        w.writeheader()
        w.writerows(res["runs"])
    plots(res, train, out)
    grid_files = write_grids(grids, out)
    (out / "README.md").write_text(readme(res, train, cmp_cpu, cmp_ideal, grid_files, out))
    print(f"wrote {out}/README.md, fidelity.json, fidelity.csv, plots and grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
