"""Caching fidelity study on the shipped tiny models (skipdit_fast/weights/).

    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py [--out bench/results/fidelity-cpu] [--quick]
    OMP_WAIT_POLICY=PASSIVE python bench/fidelity.py --video    # -> bench/results/fidelity-cpu/video

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

--video: the same question for video, on the shipped tiny Latte / Latte-skip (moving
digits, 8 frames): latte-skip+skipcache (Skip-Cache with the official Latte
thresholds, K in block pairs), latte+fora, latte+split and latte-skip+fora; PSNR / SSIM
over all frames, accuracy and FD from the frame classifier on every frame (against
the frames of real moving-digit clips).

Writes <out>/fidelity.json (every number), fidelity.csv, README.md (tables and what
they show), psnr_vs_speedup.png, training_curves.png and sample grids (GIFs for video).

--pareto: every cache at equal measured speedup over --seeds (PARETO.md, pareto.*),
with calibrated schedules made first and written to <out>/calibrated.json as soon
as they are (or taken from an earlier run's pareto.json or calibrated.json: --schedules);
each level's margin of the calibrated schedule over the best other method is paired
by seed (the seed's share of the spread cancels) with a 95% interval. --report
a/pareto.json b/pareto.json ... writes that report for several runs of the same
schedules on different seeds together, running nothing.
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
from skipdit_fast.files import atomic_path, save_figure, write_atomic  # noqa: E402
from skipdit_fast.cache.baselines import CachedModel, ForaCache  # noqa: E402
from skipdit_fast.cache.schedule import CacheSchedule  # noqa: E402
from skipdit_fast.sampling.diffusion import sample  # noqa: E402
from skipdit_fast.data.digits import digits, split, to_unit  # noqa: E402
from skipdit_fast.data.moving_digits import clip_split, moving_digits  # noqa: E402
from skipdit_fast.evaluation.digits import DigitClassifier, as_images, frame_classifier_path, scores  # noqa: E402
from skipdit_fast.evaluation.metrics import frechet_distance, psnr, ssim  # noqa: E402
from skipdit_fast.apps.train import machine_info  # noqa: E402


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows (dicts with the first row's keys) as a CSV file, written atomically."""
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
from skipdit_fast.pretrained import PAIRS, WEIGHTS_DIR, load_pretrained  # noqa: E402

METHODS = {
    "skipdit+skipcache": ("tiny-skipdit", "skipcache"),
    "dit+fora": ("tiny-dit", "fora"),
    "dit+split": ("tiny-dit", "skipcache"),
    "skipdit+fora": ("tiny-skipdit", "fora"),
}
VIDEO_METHODS = {
    "latte-skip+skipcache": ("tiny-latte-skip", "skipcache"),
    "latte+fora": ("tiny-latte", "fora"),
    "latte+split": ("tiny-latte", "skipcache"),
    "latte-skip+fora": ("tiny-latte-skip", "fora"),
}
# the same colour for the same role in both studies
COLORS = dict(zip([*METHODS, *VIDEO_METHODS], ["tab:red", "tab:blue", "tab:green", "tab:orange"] * 2))
# kind -> what the study compares and how its samples are scored
STUDIES = {
    "image": dict(methods=METHODS, pair=PAIRS["image"], what="DiT", skip_what="Skip-DiT", out="fidelity-cpu",
                  desc="depth 12, width 64, 16x16x1 digits", unit="blocks"),
    "video": dict(methods=VIDEO_METHODS, pair=PAIRS["video"], what="Latte", skip_what="Latte-skip",
                  out="fidelity-cpu/video", desc="6 spatial/temporal block pairs, width 64, patch 4, "
                  "8 frames of 16x16x1 moving digits", unit="block pairs"),
}


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


def real_data(kind: str, clf):
    """(real samples, labels, train indices, test indices): the digits, or the
    moving-digit clips at the shipped video models' frames and canvas."""
    if kind == "video":
        cfg = load_pretrained(PAIRS["video"][1]).config
        x, y = moving_digits(cfg.num_frames, cfg.input_size)
        tr, te = clip_split()
        return x, y, tr, te
    x, y = digits(clf.size)
    tr, te = split(len(x))
    return x, y, tr, te


def run_study(args) -> dict:
    study = STUDIES[args.kind]
    methods = study["methods"]
    torch.manual_seed(0)
    clf = DigitClassifier.load(frame_classifier_path() if args.kind == "video" else None)
    real, real_y, tr, te = real_data(args.kind, clf)
    real_feats = clf.features(as_images(real))
    labels = torch.arange(10).repeat(args.per_class)
    models = {name: CachedModel(load_pretrained(name)) for name in study["pair"]}
    out = {"settings": {"kind": args.kind, "steps": args.steps, "sampler": "ddpm", "samples": len(labels),
                        "seed": args.seed, "repeats": args.repeats,
                        "intervals": args.intervals, "branches": args.branches,
                        "threads": torch.get_num_threads()},
           "machine_start": machine_info(), "torch": torch.__version__,
           "classifier": {"test_accuracy_real": clf.test_accuracy,
                          "fd_real_train_vs_test": None}, "baselines": {}, "runs": []}
    out["classifier"]["fd_real_train_vs_test"] = frechet_distance(clf.features(as_images(real[tr])),
                                                                  clf.features(as_images(real[te])))
    # the floor at this sample size: real digits (clips), as many per class as the samples
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.cat([torch.nonzero(real_y == c)[:, 0][torch.randperm(int((real_y == c).sum()), generator=g)]
                      [:args.per_class] for c in range(10)])
    sub = scores(clf, real_feats, real[pick], real_y[pick])
    out["classifier"]["fd_real_subset"] = sub["fd"]
    out["classifier"]["accuracy_real_subset"] = sub["accuracy"]

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

    for method, (mname, kind) in methods.items():
        m = models[mname]
        for n in args.intervals:
            for k in (args.branches if kind == "skipcache" else [None]):
                cache = SkipCache.for_model(m, interval=n, branch=k) if kind == "skipcache" else ForaCache(n)
                r, cpu = timed_sample(m, labels, args.steps, args.seed, cache=cache, repeats=args.repeats)
                bw, bc, bx = base[mname]
                a, b = to_unit(bx), to_unit(r.latents)
                rep = r.report
                row = {"method": method, "model": mname, "N": n, "K": k,
                       "wall_s": r.seconds, "cpu_s": cpu, "speedup_wall": bw / r.seconds, "speedup_cpu": bc / cpu,
                       "ideal_speedup": rep.steps / rep.full_steps if kind == "fora" else rep.ideal_speedup,
                       "full_steps": rep.full_steps, "cached_steps": rep.cached_steps,
                       "psnr": psnr(a, b), "ssim": ssim(as_images(a), as_images(b)),
                       **scores(clf, real_feats, r.latents, labels)}
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


def compare_at_equal_speedup(runs, key="speedup_cpu", grid=(1.25, 1.5, 1.75, 2.0, 2.5, 3.0), methods=METHODS):
    fronts = {m: envelope([r for r in runs if r["method"] == m], key) for m in methods}
    table = []
    for s in grid:
        table.append({"speedup": s, **{m: psnr_at(fronts[m], s) for m in methods}})
    return table


def training_summary(weights_dir: Path, pair=PAIRS["image"]) -> dict:
    base, skip = pair
    logs = {}
    for name in pair:
        j = json.loads((weights_dir / f"{name}.train.json").read_text())
        rows = list(csv.DictReader(open(weights_dir / f"{name}.train.csv")))
        logs[name] = {"eval": j["eval"], "loss": [float(r["loss"]) for r in rows],
                      "mse": [float(r["mse"]) for r in rows], "wall_s": j["wall_s"], "cpu_s": j["cpu_s"],
                      "steps": j["steps"]}
    ev = {n: {e["step"]: e["loss"] for e in logs[n]["eval"]} for n in logs}
    common = sorted(set(ev[base]) & set(ev[skip]))
    later = [s for s in common if s >= 100]
    lower = sum(ev[skip][s] < ev[base][s] for s in later)
    diff = [ev[skip][s] - ev[base][s] for s in later]

    def first_below(name, thr):
        return next((s for s in common if ev[name][s] <= thr), None)

    final_dit = ev[base][common[-1]]
    thresholds = {f"{thr:.4f}": {n: first_below(n, thr) for n in pair}
                  for thr in (final_dit * 1.25, final_dit * 1.1, final_dit * 1.02)}
    return {"logs": logs, "eval_steps": common, "skip_lower_count": lower, "points": len(later),
            "mean_eval_diff_skip_minus_dit": float(np.mean(diff)) if diff else None,
            "final_eval": {n: ev[n][common[-1]] for n in pair}, "first_reaching": thresholds}


def plots(res: dict, train: dict, out: Path, methods=METHODS, pair=PAIRS["image"]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "speedup_cpu", "speedup (process CPU time)"),
                           (axes[1], "ideal_speedup", "ideal speedup (block count)")):
        for m in methods:
            rows = [r for r in res["runs"] if r["method"] == m]
            ax.scatter([r[key] for r in rows], [r["psnr"] for r in rows], color=COLORS[m], label=m, s=22,
                       marker="^" if methods[m][0] == pair[1] else "o")
            front = envelope(rows, key)
            ax.plot([p[0] for p in front], [p[1] for p in front], color=COLORS[m], lw=1)
            for r in rows:
                ax.annotate(f"{r['N']}" + (f"/{r['K']}" if r["K"] else ""), (r[key], r["psnr"]),
                            fontsize=6, color=COLORS[m], xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel(title)
        ax.set_ylabel("PSNR cached vs uncached (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny {res['settings']['kind']} models on digits, DDPM {res['settings']['steps']} steps, "
                 f"{res['settings']['samples']} samples; labels N/K")
    fig.tight_layout()
    p = out / "psnr_vs_speedup.png"
    save_figure(fig, p)
    plt.close(fig)
    written.append(p.name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, color in zip(pair, ("tab:blue", "tab:red")):
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
    save_figure(fig, p)
    plt.close(fig)
    written.append(p.name)
    return written


def write_grids(grids: dict, out: Path) -> list[str]:
    from skipdit_fast.apps.demo import digit_grid
    from skipdit_fast.apps.common import video_grid, write_png, write_video

    names = []
    for title, img in grids.items():
        stem = "samples_" + title.replace(" ", "_").replace("=", "").replace("+", "-")
        if img.dim() == 5:  # videos: a GIF, 10 per row (one of each class)
            write_video(str(out / f"{stem}.gif"), video_grid(img[:20], cols=10, scale=3), fps=4)
            names.append((title, f"{stem}.gif"))
        else:
            write_png(str(out / f"{stem}.png"), digit_grid(img[:30], 10, scale=3))
            names.append((title, f"{stem}.png"))
    return names


def fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def verdict(cmp, methods=METHODS, names=("Skip-DiT", "DiT")) -> str:
    """Skip-Cache on the model with skips against the better of the two caches of the
    vanilla model (FORA, the split), at the speedups all three reach."""
    ours, fora, split_ = list(methods)[:3]
    rows = [r for r in cmp if all(r[m] is not None for m in (ours, fora, split_))]
    if not rows:
        return "no speedup level is reached by all three methods"
    wins = [r for r in rows if r[ours] > max(r[fora], r[split_])]
    margins = ", ".join(f"{r['speedup']:.2f}x: {r[ours] - max(r[fora], r[split_]):+.1f} dB" for r in rows)
    return (f"{names[0]} + Skip-Cache has the higher PSNR at {len(wins)} of the {len(rows)} speedup levels that all "
            f"three reach (its PSNR minus the better vanilla-{names[1]} cache's: {margins})")


def readme(res: dict, train: dict, cmp_cpu, cmp_ideal, grid_files, out: Path) -> str:
    st = res["settings"]
    study = STUDIES[st.get("kind", "image")]
    methods, (base, skip) = study["methods"], study["pair"]
    W, S = study["what"], study["skip_what"]
    video = st.get("kind") == "video"
    unit = "frames" if video else "samples"
    L = [f"# Caching fidelity: {S} + Skip-Cache vs vanilla {W} + FORA / split ({date.today()})", "",
         f"Generated by `bench/fidelity.py{' --video' if video else ''}` on "
         f"{res['machine_start'].get('cpu_model', '?')} "
         f"({res['machine_start']['cpus']} cores, {st['threads']} torch threads), torch {res['torch']}. "
         f"Load average at start {res['machine_start'].get('load_average')}, at end "
         f"{res['machine_end'].get('load_average')}: the machine was shared, so wall times are noisy; "
         "the speedups use process CPU time (wall speedups are in the table and fidelity.json).", "",
         f"Models: the shipped tiny {W} and {S} (skipdit_fast/weights/, same config but the long skips: "
         f"{study['desc']}). "
         f"Sampling: DDPM {st['steps']} steps, {st['samples']} {'videos' if video else 'samples'} "
         f"({st['samples'] // 10} per class), "
         f"seed {st['seed']}, cached and uncached runs from the same noise. PSNR / SSIM: cached vs uncached "
         f"samples of the same model, on {'all frames' if video else 'images'} in [0, 1]. Quality: a small CNN "
         f"trained on the same {'frames' if video else 'digits'} "
         f"({100 * res['classifier']['test_accuracy_real']:.1f}% on held-out real {unit}): accuracy = share of "
         f"{unit} it labels as their {'video' if video else 'sample'}'s class (chance 10%), FD = Frechet "
         f"distance of its 64 penultimate features to those of the real {unit} (the same for "
         f"{st['samples']} real {'clips' if video else 'digits'}, {st['samples'] // 10} per class: "
         f"FD {res['classifier']['fd_real_subset']:.1f}, accuracy {res['classifier']['accuracy_real_subset']:.3f}; "
         f"real train split vs test split: FD {res['classifier']['fd_real_train_vs_test']:.1f}). "
         f"Timing: the fastest of {st['repeats']} runs per setting ({st['repeats'] + 1} for the uncached ones)."
         + (" Skip-Cache with the official Latte thresholds (full while t >= 900, reset after t < 50); K counts "
            "spatial/temporal block pairs, FORA reuses every block's attention and MLP outputs."
            if video else ""), ""]
    L += ["## Uncached baselines", "", "| model | wall s | CPU s | accuracy | FD |", "| --- | --- | --- | --- | --- |"]
    for n, b in res["baselines"].items():
        L.append(f"| {n} | {b['wall_s']:.2f} | {b['cpu_s']:.2f} | {b['accuracy']:.3f} | {b['fd']:.1f} |")
    L += ["", "## PSNR at equal speedup", "",
          "Best PSNR each method reaches at a speedup of at least s (over its N, K settings; `-`: never that fast).", ""]
    for title, cmp in (("measured speedup (CPU time)", cmp_cpu), (f"ideal speedup ({study['unit']} count)", cmp_ideal)):
        L += [f"By {title}:", "", "| s | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 1) + "|"]
        for row in cmp:
            L.append(f"| {row['speedup']:.2f} | " + " | ".join(fmt(row[m], ".1f") for m in methods) + " |")
        L += ["", f"By {title}: {verdict(cmp, methods, (S, W))}.", ""]
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
          f"Both models: {t['logs'][base]['steps']} steps, same seed, data order and noise. "
          f"Fixed-batch loss at the last step: {W} {t['final_eval'][base]:.4f}, "
          f"{S} {t['final_eval'][skip]:.4f}. From step 100 on, {S}'s fixed-batch loss is the "
          f"lower one at {t['skip_lower_count']} of {t['points']} evaluation points (mean difference {S} - {W} "
          f"{t['mean_eval_diff_skip_minus_dit']:+.4f}). First step at which the fixed-batch loss reaches "
          f"a level (levels relative to {W}'s final loss):", "",
          f"| level | {base} | {skip} |", "| --- | --- | --- |"]
    for thr, d in t["first_reaching"].items():
        L.append(f"| {thr} | {d[base]} | {d[skip]} |")
    faster = t["skip_lower_count"] > t["points"] / 2 and t["mean_eval_diff_skip_minus_dit"] < 0
    L += ["", "Faster convergence with long skips on these tiny models: " +
          (f"yes: {S}'s fixed-batch loss is lower at most evaluation points." if faster else
           f"no: {S}'s fixed-batch loss is not lower at most evaluation points.") +
          " (One training run per model, one seed: a small difference may not hold for other seeds.)"]
    L += ["", "![training curves](training_curves.png)", ""]
    L += ["## Sample grids" + (" (GIFs: one clip of each class per row)" if video else ""), ""]
    for title, fn in grid_files:
        L.append(f"- {title}: ![{title}]({fn})")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------
# --pareto: every method at equal measured speedup, several seeds (issue 14)

PARETO_LEVELS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
PARETO_COLORS = {"skipdit+calibrated": "tab:red", "skipdit+skipcache": "tab:pink", "skipdit+adaptive": "tab:purple",
                 "skipdit+fora": "tab:orange", "skipdit+fbcache": "tab:brown", "skipdit+hybrid": "tab:olive", "skipdit+extrap": "tab:gray", "dit+fora": "tab:blue",
                 "dit+fbcache": "tab:cyan", "dit+split": "tab:green"}


# per kind: (vanilla model, skip model), method prefixes, Skip-Cache (N, K), hybrid (N, K), extrapolated
# reuse N, branches
def _pareto_study(kind: str, **kw) -> dict:
    """A Pareto study's settings: the models, names and unit of STUDIES[kind] and kw."""
    st = STUDIES[kind]
    return dict(pair=st["pair"], what=(st["what"], st["skip_what"]), unit=st["unit"], **kw)


PARETO_STUDIES = {
    "image": _pareto_study("image", prefix=("dit", "skipdit"),
                           skipcache=((2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (4, 1), (4, 2), (6, 1), (8, 1), (10, 1)),
                           hybrid=((2, 2), (3, 1), (3, 2), (4, 1), (4, 2), (6, 2)), extrap=(2, 3, 4, 5),
                           branches=[1, 2, 3], adaptive=True,
                           per_class=3, classifier=None),
    "video": _pareto_study("video", prefix=("latte", "latteskip"),
                           skipcache=((2, 1), (2, 2), (3, 1), (4, 1), (6, 1)),
                           hybrid=((2, 1), (3, 1), (4, 1), (6, 1)), extrap=(2, 3, 4), branches=[1, 2], adaptive=False,
                           per_class=2,
                           classifier="frames"),
}


def pareto_configs(args, calibrated: dict, kind: str = "image") -> list[tuple[str, str, str, object]]:
    """(method, model, label, cache factory) for every setting of the study."""
    from skipdit_fast.analysis.calibrate import interval_code
    from skipdit_fast.cache.baselines import FirstBlockCache

    st = PARETO_STUDIES[kind]
    (van, sk), (pv, ps) = st["pair"], st["prefix"]
    cfgs = []
    for n, k in st["skipcache"]:
        cfgs.append((f"{ps}+skipcache", sk, f"N={n} K={k}",
                     lambda m, n=n, k=k: SkipCache.for_model(m, interval=n, branch=k)))
    for n, k in st["hybrid"]:
        cfgs.append((f"{ps}+hybrid", sk, f"N={n} K={k}",
                     lambda m, n=n, k=k: SkipCache.for_model(m, interval=n, branch=k, reuse_outer=True)))
    for n in st["extrap"]:   # the extrapolated reuse step kind (cache/reuse.py) at a fixed interval
        cfgs.append((f"{ps}+extrap", sk, f"N={n}", lambda m, n=n: SkipCache(
            schedule=CacheSchedule.from_code(interval_code("X", args.steps, n), m.depth))))
    for th in ((0.3, 0.4, 0.55, 0.8) if st["adaptive"] else ()):
        cfgs.append((f"{ps}+adaptive", sk, f"thr={th} K=1",
                     lambda m, th=th: SkipCache.for_model(m, interval=10, branch=1, threshold=th)))
    for name, mname in ((f"{pv}+fora", van), (f"{ps}+fora", sk)):
        for n in (2, 3, 4, 5, 6):
            cfgs.append((name, mname, f"N={n}", lambda m, n=n: ForaCache(n)))
    for name, mname in ((f"{pv}+fbcache", van), (f"{ps}+fbcache", sk)):
        for th in (0.15, 0.2, 0.3, 0.45):
            cfgs.append((name, mname, f"thr={th}", lambda m, th=th: FirstBlockCache(th)))
    for target, sched in calibrated.items():
        cfgs.append((f"{ps}+calibrated", sk, f"target={target}x",
                     lambda m, sched=sched: SkipCache(schedule=sched)))
    return cfgs


def _color(method: str):
    """The image study's colour of a method (video prefixes mapped onto it)."""
    return PARETO_COLORS.get(method.replace("latteskip+", "skipdit+").replace("latte+", "dit+"))


def run_pareto(args, out_dir: Path | None = None) -> dict:
    """The Pareto study of args. A fresh calibration is also written to
    out_dir/calibrated.json as soon as it ends (what --schedules reads), so an
    evaluation that is interrupted can be rerun without calibrating again."""
    from skipdit_fast.analysis.calibrate import MODES, measure_errors, search_schedule

    kind = "video" if args.video else "image"
    pst = PARETO_STUDIES[kind]
    skip_name = pst["pair"][1]
    torch.manual_seed(0)
    clf = DigitClassifier.load(frame_classifier_path() if pst["classifier"] == "frames" else None)
    real, real_y, tr, te = real_data(kind, clf)
    real_feats = clf.features(as_images(real))
    labels = torch.arange(10).repeat(args.per_class)
    models = {name: CachedModel(load_pretrained(name)) for name in pst["pair"]}
    out = {"settings": {"kind": f"{kind}-pareto", "models": list(pst["pair"]), "what": list(pst["what"]),
                        "unit": pst["unit"], "steps": args.steps, "sampler": "ddpm", "samples": len(labels),
                        "seeds": args.seeds, "repeats": args.repeats, "threads": torch.get_num_threads(),
                        "calibration": {"seed": 1000, "labels": list(range(10)) * 2, "max_gap": 12,
                                        "branches": pst["branches"], "modes": list(MODES), "rollouts": args.rollouts,
                                        "time_batch": len(labels), "targets": args.targets, "retime": args.retime,
                                        "overshoot": args.overshoot, "validate_seeds": args.validate_seeds}},
           "machine_start": machine_info(), "torch": torch.__version__, "baselines": {}, "runs": []}
    t0 = time.perf_counter()
    c0 = time.process_time()
    if args.schedules:  # the calibrated schedules of an earlier run (its pareto.json)
        prev = json.loads(Path(args.schedules).read_text())
        calibrated = {float(t): CacheSchedule.from_dict(d) for t, d in prev["schedules"].items()}
        out["calibration_wall_s"], out["calibration_cpu_s"] = prev["calibration_wall_s"], prev["calibration_cpu_s"]
        # what made them, not this command's calibration flags (it ran no calibration)
        out["settings"]["calibration"] = dict(prev["settings"]["calibration"], **{"from": str(args.schedules)})
    else:
        skipm = models[skip_name].model
        table = measure_errors(skipm, list(range(10)) * 2, steps=args.steps, seed=1000, max_gap=12,
                               branches=pst["branches"], time_batch=len(labels))
        calibrated = {t: search_schedule(skipm, table, speedup=t, rollouts=args.rollouts, retime=args.retime,
                                         overshoot=args.overshoot, validate_seeds=args.validate_seeds, name=skip_name, log=print)
                      for t in args.targets}
        out["calibration_wall_s"], out["calibration_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    out["schedules"] = {str(t): s.to_dict() for t, s in calibrated.items()}
    if out_dir is not None and not args.schedules:
        keep = ("settings", "machine_start", "torch", "schedules", "calibration_wall_s", "calibration_cpu_s")
        write_atomic(out_dir / "calibrated.json", json.dumps({k: out[k] for k in keep}, indent=1, default=str) + "\n")
        print(f"wrote {out_dir}/calibrated.json (--schedules takes it)", flush=True)
    print(f"calibrated in {out['calibration_wall_s']:.1f} s: " +
          "; ".join(f"{t}x {s!r}" for t, s in calibrated.items()), flush=True)
    for m in models.values():
        sample(m, labels[:10], steps=3, seed=0)
    base = {}
    for seed in args.seeds:
        for name, m in models.items():
            r, cpu = timed_sample(m, labels, args.steps, seed, repeats=args.repeats + 1)
            base[name, seed] = (r.seconds, cpu, r.latents)
            out["baselines"][f"{name} seed={seed}"] = {"model": name, "seed": seed, "wall_s": r.seconds, "cpu_s": cpu,
                                                      **scores(clf, real_feats, r.latents, labels)}
            print(f"{name} seed {seed} uncached: {r.seconds:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    for method, mname, label, make in pareto_configs(args, calibrated, kind):
        m = models[mname]
        for seed in args.seeds:
            cache = make(m)
            # side by side: uncached and cached runs alternate, the fastest of each counts
            bw, bc, bx = base[mname, seed]
            r, cpu = None, math.inf
            for _ in range(args.repeats):
                u, ucpu = timed_sample(m, labels, args.steps, seed)
                bw, bc = min(bw, u.seconds), min(bc, ucpu)
                c, ccpu = timed_sample(m, labels, args.steps, seed, cache=cache)
                if r is None or c.seconds < r.seconds:
                    r = c
                cpu = min(cpu, ccpu)
            rep = r.report
            blocks = (rep.blocks_total / rep.blocks_run) if rep.blocks_run else float("inf")
            row = {"method": method, "model": mname, "setting": label, "seed": seed, "wall_s": r.seconds,
                   "cpu_s": cpu, "speedup_wall": bw / r.seconds, "speedup_cpu": bc / cpu,
                   "block_ratio": blocks, "full_steps": rep.full_steps, "cached_steps": rep.cached_steps,
                   "psnr": psnr(to_unit(bx), to_unit(r.latents)),
                   "ssim": ssim(as_images(to_unit(bx)), as_images(to_unit(r.latents))), **scores(clf, real_feats, r.latents, labels)}
            out["runs"].append(row)
        rows = [x for x in out["runs"] if x["method"] == method and x["setting"] == label]
        print(f"{method:18s} {label:14s}: speedup {np.mean([x['speedup_cpu'] for x in rows]):.2f}x CPU "
              f"(blocks {rows[0]['block_ratio']:.2f}x), PSNR {np.mean([x['psnr'] for x in rows]):.1f} "
              f"+- {np.std([x['psnr'] for x in rows]):.1f} dB, acc {np.mean([x['accuracy'] for x in rows]):.3f}, "
              f"FD {np.mean([x['fd'] for x in rows]):.1f}", flush=True)
    out["machine_end"] = machine_info()
    return out


def pareto_points(runs) -> list[dict]:
    """One point per (method, setting): means and standard deviations over the seeds."""
    pts = {}
    for r in runs:
        pts.setdefault((r["method"], r["setting"]), []).append(r)
    res = []
    for (method, setting), rows in pts.items():
        d = {"method": method, "setting": setting, "model": rows[0]["model"], "seeds": len(rows)}
        for key in ("speedup_cpu", "speedup_wall", "block_ratio", "psnr", "ssim", "accuracy", "fd"):
            v = np.array([x[key] for x in rows], dtype=float)
            with np.errstate(invalid="ignore"):   # inf PSNR (a run equal to the uncached one): std nan
                d[key], d[key + "_std"] = float(v.mean()), float(v.std())
        res.append(d)
    return res


def pareto_table(points, key="speedup_cpu", levels=PARETO_LEVELS) -> list[dict]:
    """Per speedup level s and method: the point with the best mean PSNR among those
    whose mean speedup (key) is >= s; None when the method never gets that fast."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    table = []
    for s in levels:
        row = {"speedup": s}
        for m in methods:
            cand = [p for p in points if p["method"] == m and p[key] >= s]
            row[m] = max(cand, key=lambda p: p["psnr"]) if cand else None
        table.append(row)
    return table


# two-sided 95% quantiles of Student's t by degrees of freedom (rounded up; >= 60: 2.0)
T95 = {1: 12.71, 2: 4.31, 3: 3.19, 4: 2.78, 5: 2.58, 6: 2.45, 7: 2.37, 8: 2.31, 9: 2.27, 10: 2.23}


def t95(df: int) -> float:
    return T95.get(df) or (2.18 if df < 15 else 2.13 if df < 30 else 2.05 if df < 60 else 2.0)


def paired_margin(runs, a: tuple[str, str], b: tuple[str, str]) -> dict:
    """PSNR of setting a minus setting b ((method, setting) each), paired by seed (the
    same noise and labels: most of the seed-to-seed spread is shared): mean, standard
    error and the half-width of its 95% confidence interval (Student's t, seeds - 1
    degrees of freedom) over their common seeds; verdict "higher" / "lower" when the
    interval excludes 0, else "tie within noise" ("equal" when every seed's samples
    are the same)."""
    pa = {r["seed"]: r["psnr"] for r in runs if (r["method"], r["setting"]) == tuple(a)}
    pb = {r["seed"]: r["psnr"] for r in runs if (r["method"], r["setting"]) == tuple(b)}
    d = np.array([pa[s] - pb[s] for s in sorted(set(pa) & set(pb))], dtype=float)
    out = {"seeds": len(d), "mean": float(d.mean()) if len(d) else float("nan")}
    if len(d) and np.all(d == 0):
        out["verdict"] = "equal (the same samples)"
        return out
    if len(d) < 2 or not np.isfinite(d).all():
        out["verdict"] = "not enough seeds" if len(d) < 2 else "not finite (a run equal to the uncached one)"
        return out
    sem = float(d.std(ddof=1) / math.sqrt(len(d)))
    half = t95(len(d) - 1) * sem
    out.update(sem=sem, ci95=half, verdict="higher" if out["mean"] - half > 0 else
               "lower" if out["mean"] + half < 0 else "tie within noise")
    return out


def level_margins(runs, table, focus: str = "+calibrated") -> list[dict]:
    """Per level of a pareto_table: the best setting of the method ending in `focus`
    against the best other method's (by mean PSNR), paired by seed (paired_margin);
    levels where either is missing are left out."""
    out = []
    for row in table:
        got = {m: p for m, p in row.items() if m != "speedup" and p is not None}
        mine = [m for m in got if m.endswith(focus)]
        others = [m for m in got if not m.endswith(focus)]
        if not mine or not others:
            continue
        f, o = mine[0], max(others, key=lambda m: got[m]["psnr"])
        out.append({"speedup": row["speedup"], "method": f, "setting": got[f]["setting"], "other": o,
                    "other_setting": got[o]["setting"],
                    **paired_margin(runs, (f, got[f]["setting"]), (o, got[o]["setting"]))})
    return out


def margins_text(margins) -> str:
    def one(g):
        ci = f" +- {g['ci95']:.2f}" if "ci95" in g else ""
        return (f"{g['speedup']:.2f}x: {g['mean']:+.2f}{ci} dB against {g['other']} {g['other_setting']} "
                f"({g['verdict']})")
    return "; ".join(one(g) for g in margins)


def pareto_plot(points, res, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p["method"] for p in points))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (ykey, ylabel) in zip(axes, (("psnr", "PSNR cached vs uncached (dB)"),
                                         ("accuracy", "classifier accuracy"), ("fd", "FD to real digits"))):
        for m in methods:
            ps = sorted((p for p in points if p["method"] == m), key=lambda p: p["speedup_cpu"])
            ax.errorbar([p["speedup_cpu"] for p in ps], [p[ykey] for p in ps],
                        xerr=[p["speedup_cpu_std"] for p in ps], yerr=[p[ykey + "_std"] for p in ps],
                        color=_color(m), label=m, fmt="o" if m.startswith(("dit+", "latte+")) else "^", ms=4,
                        lw=0.8, capsize=2, ls="-" if m.endswith("+calibrated") or m in ("dit+fora", "latte+fora")
                        else ":")
        ax.set_xlabel("measured speedup (process CPU time ratio)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    st = res["settings"]
    what = st.get("what", ["DiT", "Skip-DiT"])
    fig.suptitle(f"tiny {what[0]} / {what[1]} on {'moving ' if st['kind'].startswith('video') else ''}digits, DDPM {st['steps']} steps, {st['samples']} samples x "
                 f"{len(st['seeds'])} seeds (mean +- std over seeds)")
    fig.tight_layout()
    p = out / "pareto.png"
    save_figure(fig, p)
    plt.close(fig)
    return p.name


def pareto_readme(res, points, table_cpu, table_blocks) -> str:
    st = res["settings"]
    methods = list(dict.fromkeys(p["method"] for p in points))
    L = [f"# Pareto study: every cache at equal measured speedup ({date.today()})", "",
         f"Generated by `bench/fidelity.py --pareto` on {res['machine_start'].get('cpu_model', '?')} "
         + (f"(merged with --report from {', '.join(f'`{f}`' for f in res['merged_from'])}: the same "
            "calibrated schedules on different seeds; the machine at the start of the first and the end of "
            "the last) " if len(res.get("merged_from", ())) > 1 else "")
         + (f"(calibrated schedules from `{st['calibration']['from']}`) " if st["calibration"].get("from") else "")
         + f"({res['machine_start']['cpus']} cores, {st['threads']} torch threads; shared with other jobs, load "
         f"average {res['machine_start'].get('load_average')} at start, {res['machine_end'].get('load_average')} "
         f"at end), torch {res['torch']}. Shipped tiny {st.get('what', ['DiT'])[0]} and "
         f"{st.get('what', [0, 'Skip-DiT'])[1]}, DDPM {st['steps']} steps, "
         f"{st['samples']} samples ({st['samples'] // 10} per class) per seed, seeds {st['seeds']}; every cached "
         f"run is compared with the uncached run of the same model and seed. Measured speedup = process CPU "
         f"time ratio against that uncached run, timed side by side: for each setting and seed, {st['repeats']} "
         "uncached and cached runs alternate and the fastest of each counts (the uncached one also against the "
         "start-of-study baseline); "
         f"block ratio = blocks an uncached run runs / blocks run (FORA: full steps only count; first-block "
         f"check: block 0 on every step; hybrid and (extrapolated) reuse steps run no block; extrap: every "
         f"step between full ones an extrapolated reuse step). Calibrated schedules: "
         f"`skipdit_fast.analysis.calibrate` (measure_errors + search_schedule) on one calibration run (seed 1000, "
         f"labels 0-9 twice, not an evaluation seed; every step kind of the engine: "
         f"{', '.join(st['calibration'].get('modes', ['cached', 'hybrid', 'reuse']))} (K {st['calibration'].get('branches')}); "
         f"step times measured at batch {st['calibration'].get('time_batch', '?')}; up to "
         f"{st['calibration'].get('rollouts', '?')} local-search rollouts per target; "
         + (f"searched again up to {st['calibration']['retime']} times with the per-step overhead that explains "
            "a measured speedup below the target on the calibration run"
            + (f" or more than {100 * st['calibration']['overshoot']:.0f}% above it, the timed schedule that met "
               "the target with the least error kept" if st['calibration'].get('overshoot') else "")
            + "; " if st['calibration'].get('retime') else "")
         + (f"the kept schedule, the other timed ones that met the target and the 4 best start candidates then "
            f"compared on seeds {st['calibration']['validate_seeds']}, the best there that measured at least the "
            "target on the calibration run kept (candidates never timed are timed first)"
            if st['calibration'].get('validate_seeds')
            else "no validation seed") +
         f"), speedup targets "
         f"{st['calibration']['targets']} in measured time (the defaults are 6% above the table's levels: the "
         f"calibration run's timing is a sample of the evaluation runs', and 3% above fell short of two levels "
         f"once); calibration took {res['calibration_cpu_s']:.0f} CPU s "
         f"({res['calibration_wall_s']:.0f} s wall), not counted in the speedups.", "",
         "## Best PSNR at a measured speedup of at least s", "",
         "Mean +- std over the seeds of the setting with the best mean PSNR among those whose mean measured speedup "
         "is >= s (`-`: the method never gets that fast).", ""]
    for title, tab, margins in (("measured speedup (CPU time)", table_cpu, res["margins_cpu"]),
                                ("block ratio", table_blocks, res["margins_blocks"])):
        L += [f"By {title}:", "", "| s | " + " | ".join(methods) + " |", "| --- " * (len(methods) + 1) + "|"]
        for row in tab:
            cells = []
            for m in methods:
                p = row[m]
                cells.append("-" if p is None else f"{p['psnr']:.1f} +- {p['psnr_std']:.1f} ({p['setting']})")
            L.append(f"| {row['speedup']:.2f} | " + " | ".join(cells) + " |")
        best = []
        for row in tab:
            got = {m: row[m]["psnr"] for m in methods if row[m] is not None}
            if got:
                best.append(f"{row['speedup']:.2f}x: {max(got, key=got.get)}")
        L += ["", f"Highest mean PSNR by {title}: " + "; ".join(best) + ".", ""]
        if margins:
            L += [f"{margins[0]['method']} minus the best other method at each level (by {title}), paired by "
                  f"seed: mean +- the 95% confidence half-width over the {len(st['seeds'])} seeds (Student's t): "
                  + margins_text(margins) + ".", ""]
    L += ["## All settings (means over seeds)", "",
          "| method | setting | speedup CPU | speedup wall | block ratio | PSNR dB | SSIM | accuracy | FD |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        L.append(f"| {p['method']} | {p['setting']} | {p['speedup_cpu']:.2f} +- {p['speedup_cpu_std']:.2f} | "
                 f"{p['speedup_wall']:.2f} | {p['block_ratio']:.2f} | {p['psnr']:.1f} +- {p['psnr_std']:.1f} | "
                 f"{p['ssim']:.3f} | {p['accuracy']:.3f} | {p['fd']:.1f} |")
    L += ["", "Uncached: " + "; ".join(f"{k}: acc {b['accuracy']:.3f}, FD {b['fd']:.1f}, {b['cpu_s']:.2f} CPU s"
                                       for k, b in res["baselines"].items()), "",
          "Calibrated schedules (F full, digit: cached with that K, a/b/c: hybrid with K 1/2/3, R: reuse, "
          "X: extrapolated reuse):", ""]
    for t, d in res["schedules"].items():
        sched = CacheSchedule.from_dict(d)
        m = d["meta"]
        extra = ""
        if "measured_error" in m:
            best_fixed = next((c for c in m["compared"] if c["what"].startswith("interval")), None)
            extra = (f", predicted speedup {m['predicted_speedup']:.2f}x; calibration-run RMS error "
                     f"{m['measured_error']:.4f} after {m['rollouts']} rollouts, start {m['start']['what']} "
                     f"{m['start']['error']:.4f}" + (f", best fixed interval ({best_fixed['what']}) "
                                                     f"{best_fixed['error']:.4f}" if best_fixed else ""))
            if m.get("retimed"):
                extra += "; calibration-run speedup " + " -> ".join(
                    f"{r['measured_speedup']:.2f}x" + (" (kept)" if r.get("picked") else "") for r in m["retimed"])
            if m.get("validation"):
                v = m["validation"]
                extra += f"; on seeds {v['seeds']} picked {v['picked']} (" + ", ".join(
                    f"{c['what']} {c['error']:.4f}" + (f" at {c['measured_speedup']:.2f}x" if "measured_speedup" in c
                                                       else "") + (" passed over" if c.get("passed_over") else "")
                    for c in v["candidates"]) + ")"
        L.append(f"- target {t}x: `{sched.code}` (predicted error {m['predicted_error']:.3f}{extra})")
    L += ["", "![Pareto](pareto.png)", ""]
    return "\n".join(L)


def schedule_codes(res) -> dict:
    """target -> code of a pareto result's calibrated schedules."""
    return {t: CacheSchedule.from_dict(d).code for t, d in res["schedules"].items()}


def merge_pareto(paths) -> dict:
    """One study from several pareto.json files that evaluated the same calibrated
    schedules (--schedules) with the same settings on different seeds: their runs
    and baselines together, seeds in the given order. ValueError names what differs."""
    if not paths:
        raise ValueError("--report: give at least one pareto.json")
    rs = []
    for p in paths:
        try:
            rs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"--report: cannot read {p} as a pareto.json: {e}") from None
        if not {"settings", "runs", "schedules", "baselines"} <= set(rs[-1]):
            raise ValueError(f"--report: {p} is not a bench/fidelity.py --pareto result (no settings / runs / "
                             "schedules / baselines)")
    res = rs[0]   # parsed here, nobody else holds it: extended in place
    st = res["settings"]
    codes = schedule_codes(res)
    for p, r in zip(paths[1:], rs[1:]):
        for k in ("kind", "models", "steps", "sampler", "samples"):
            if r["settings"].get(k) != st.get(k):
                raise ValueError(f"--report: {p} has settings {k}={r['settings'].get(k)!r}, {paths[0]} has "
                                 f"{st.get(k)!r}: only runs of the same study merge")
        if schedule_codes(r) != codes:
            raise ValueError(f"--report: {p} evaluated other calibrated schedules than {paths[0]} (run it with "
                             f"--schedules {paths[0]})")
        again = sorted(set(st["seeds"]) & set(r["settings"]["seeds"]))
        if again:
            raise ValueError(f"--report: seeds {again} are in {p} and in an earlier file: each seed once")
        st["seeds"] = st["seeds"] + r["settings"]["seeds"]
        res["runs"] += r["runs"]
        res["baselines"].update(r["baselines"])
        res["machine_end"] = r["machine_end"]
    res["merged_from"] = [str(p) for p in paths]
    return res


def write_pareto(res, out: Path) -> None:
    """PARETO.md, pareto.json, pareto.csv and pareto.png of a study (run_pareto's or
    merge_pareto's result) in out."""
    out.mkdir(parents=True, exist_ok=True)
    points = pareto_points(res["runs"])
    t_cpu, t_blocks = pareto_table(points), pareto_table(points, "block_ratio")
    res["points"] = points
    res["table_cpu"] = [{"speedup": r["speedup"], **{m: (None if v is None else {"setting": v["setting"],
                         "psnr": v["psnr"], "psnr_std": v["psnr_std"], "speedup_cpu": v["speedup_cpu"]})
                         for m, v in r.items() if m != "speedup"}} for r in t_cpu]
    res["margins_cpu"], res["margins_blocks"] = level_margins(res["runs"], t_cpu), level_margins(res["runs"], t_blocks)
    write_atomic(out / "pareto.json", json.dumps(res, indent=1, default=str) + "\n")
    write_csv(out / "pareto.csv", res["runs"])
    pareto_plot(points, res, out)
    write_atomic(out / "PARETO.md", pareto_readme(res, points, t_cpu, t_blocks))
    print(f"wrote {out}/PARETO.md, pareto.json, pareto.csv, pareto.png")


def main_pareto(args) -> int:
    if args.report:
        try:
            res = merge_pareto(args.report)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_pareto(res, Path(args.out or Path(args.report[0]).parent))
        return 0
    out = Path(args.out or ROOT / "bench" / "results" / ("fidelity-cpu/video" if args.video else "fidelity-cpu"))
    res = run_pareto(args, out)
    write_pareto(res, out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--video", action="store_true", help="the video study (tiny Latte / Latte-skip)")
    p.add_argument("--out", help="default bench/results/fidelity-cpu (--video: bench/results/fidelity-cpu/video)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, help="samples per class (default 10; --video: 4)")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    p.add_argument("--branches", type=int, nargs="+", help="Skip-Cache K (default 1 2 3; --video: 1 2 pairs)")
    p.add_argument("--grid-interval", type=int, default=4)
    p.add_argument("--grid-branch", type=int, help="default 2 (--video: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting, the fastest counts "
                   "(the uncached baselines: one more)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 2 per class, N = 2 3, K = 1")
    p.add_argument("--pareto", action="store_true", help="every method (calibrated schedules, adaptive, FORA, "
                   "first-block check) at equal measured speedup over --seeds; writes PARETO.md, pareto.*")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--pareto: evaluation seeds")
    p.add_argument("--schedules", help="--pareto: take the calibrated schedules from this earlier "
                   "pareto.json or calibrated.json (a calibration writes one before the evaluation starts)")
    p.add_argument("--report", nargs="+", metavar="PARETO_JSON", help="--pareto: run nothing; write the report "
                   "(PARETO.md, pareto.*; --out, default the first file's folder) of these pareto.json files, "
                   "merged: the same study and schedules (--schedules) on different seeds")
    p.add_argument("--targets", type=float, nargs="+", default=[1.33, 1.6, 2.12, 2.66, 3.18, 4.25],
                   help="--pareto: speedup targets (measured time) of the calibrated schedules (default: 6%% above "
                   "the table's levels, as the calibration run's timing is a sample: at 3%% above, two of six "
                   "fell below their levels on the evaluation seeds once)")
    p.add_argument("--rollouts", type=int, default=48, help="--pareto: local-search rollouts per calibrated target")
    p.add_argument("--retime", type=int, default=3, help="--pareto: searches again when the calibration run "
                   "measures below the target or above it by more than --overshoot (search_schedule(retime=))")
    p.add_argument("--overshoot", type=float, default=0.05, help="--pareto: search_schedule(overshoot=)")
    p.add_argument("--validate-seeds", type=int, nargs="*", default=[1001, 1002, 1003], help="--pareto: seeds "
                   "the calibrated schedule is picked on among the best candidates that met the target (none: no "
                   "validation)")
    args = p.parse_args(argv)
    if args.report and not args.pareto:
        p.error("--report needs --pareto")
    if args.pareto:
        args.per_class = args.per_class or PARETO_STUDIES["video" if args.video else "image"]["per_class"]
        if args.quick:
            args.steps, args.per_class, args.seeds, args.targets, args.rollouts = 10, 1, [0], [2.0], 4
        return main_pareto(args)
    args.kind = "video" if args.video else "image"
    video = args.video
    args.per_class = args.per_class or (4 if video else 10)
    args.branches = args.branches or ([1, 2] if video else [1, 2, 3])
    args.grid_branch = args.grid_branch or (1 if video else 2)
    if args.quick:
        args.steps, args.per_class, args.intervals, args.branches = 10, 2, [2, 3], [1]
        args.grid_interval, args.grid_branch = 2, 1
    study = STUDIES[args.kind]
    out = Path(args.out or ROOT / "bench" / "results" / study["out"])
    out.mkdir(parents=True, exist_ok=True)
    res = run_study(args)
    grids = res.pop("_grids")
    train = training_summary(WEIGHTS_DIR, study["pair"])
    cmp_cpu = compare_at_equal_speedup(res["runs"], "speedup_cpu", methods=study["methods"])
    cmp_ideal = compare_at_equal_speedup(res["runs"], "ideal_speedup", methods=study["methods"])
    res["equal_speedup_cpu"], res["equal_speedup_ideal"] = cmp_cpu, cmp_ideal
    res["training"] = {k: v for k, v in train.items() if k != "logs"}
    write_atomic(out / "fidelity.json", json.dumps(res, indent=1, default=str) + "\n")
    write_csv(out / "fidelity.csv", res["runs"])
    plots(res, train, out, study["methods"], study["pair"])
    grid_files = write_grids(grids, out)
    write_atomic(out / "README.md", readme(res, train, cmp_cpu, cmp_ideal, grid_files, out))
    print(f"wrote {out}/README.md, fidelity.json, fidelity.csv, plots and grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
