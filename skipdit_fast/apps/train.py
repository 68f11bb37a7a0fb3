"""`skipdit-fast train`: a small trainer for our models (DiT / Skip-DiT, Latte /
Latte-skip: anything models.from_config builds), and the training of the shipped tiny
models.

    skipdit-fast train --model tiny-skipdit --steps 1200 --out runs/skip
    skipdit-fast train --model tiny-latte-skip --out runs/video
    skipdit-fast train --default            # what `make train-default` runs

Training is DiT's: AdamW, an EMA of the weights, and the diffusion loss of DiT's
GaussianDiffusion (skipdit_fast.sampling.DiffusionLoss) on the same linear 1000-step
schedule the samplers use (skipdit_fast.sampling.Diffusion). The model's
ops (skipdit_fast.ops attention and skip_fuse) run forward and backward on our
kernels (the CPU backend here). Labels are dropped to the null class with
probability 0.1, as DiT does, so that the null label is trained.

Deviations from DiT's recipe, for models that train in minutes on 2 CPU cores:
learning rate 1e-3 (DiT: 1e-4) with a linear warm-up and a cosine decay to 10%,
gradient-norm clipping at 1, EMA decay 0.999 (DiT: 0.9999, which would not move in a
few thousand steps) with the usual min(decay, (1 + step) / (10 + step)) warm-up, the
exact normal CDF in the decoder NLL (DiT uses a tanh approximation), and the label
embedding initialized with std 1 (DiT: 0.02). The last one matters: with DiT's 0.02 the
label's share of the conditioning c = t_emb + y_emb is ~2% of the timestep's, and after
1200 steps the models ignored the class (the eps-MSE with a wrong label was 0.1% above
the right label's; samples were digits of random classes); with std 1 the same gap is
~60% after 200 steps.

Everything random in step s (the batch, t, the noise, the label drop) comes from a
generator seeded with (seed, s), and the data order from a permutation seeded with
(seed, epoch), so a run resumed from its checkpoint (model, EMA, optimizer, step,
log) continues exactly as the uninterrupted run would.

The shipped models (`--default`, skipdit_fast.pretrained): two pairs, each trained
with the same seed, steps and batches and the same config but the long skips: a
vanilla DiT and a Skip-DiT (TINY: depth 12, width 64, 4 heads of 16, patch 2, 16x16x1
"latents", 10 classes, learn_sigma) on scikit-learn's digits, and a vanilla Latte and
a Latte-skip (TINY_VIDEO: 6 spatial/temporal pairs of the same blocks, 8 frames) on
moving digits (data.moving_digits); EMA weights in fp16 safetensors under
skipdit_fast/weights/ with the model config in the metadata, their training logs (CSV
per step, JSON summary), and the digit classifiers that score their samples (one for
digits, one for the frames of moving digits).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..models import MODEL_CLASSES, from_config
from ..files import atomic_path, write_atomic
from ..pretrained import (PAIRS, SHIPPED, TINY, TINY_VIDEO, VIDEO_MODELS, WEIGHTS_DIR, config_metadata, model_config,
                          training_data, weights_path)
from ..sampling import DiffusionLoss

@dataclass
class TrainConfig:
    model: str = "tiny-skipdit"
    steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio at `steps`
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    seed: int = 0
    label_embed_std: float = 1.0  # init std of the label embedding table (DiT: 0.02)
    eval_every: int = 50          # a fixed-batch loss of the raw weights (0: never)
    eval_size: int = 256

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _cpu_seconds() -> float:
    return time.process_time()


@dataclass
class LogRow:
    step: int
    loss: float
    mse: float
    vb: float
    lr: float
    grad_norm: float
    wall_s: float
    cpu_s: float
    eval_loss: float = float("nan")   # fixed-batch loss (every eval_every steps)
    eval_mse: float = float("nan")


class Trainer:
    """One model's training run. `run(steps)` trains, `save`/`load` checkpoint it
    (model, EMA, optimizer, step, log), `export` writes the EMA weights."""

    def __init__(self, cfg: TrainConfig, data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 model_cfg=None):
        """cfg.model names a shipped model (its config and data), or model_cfg (any
        config models.from_config builds) and data (x [N, *latent_shape], y [N])."""
        self.cfg = cfg
        self.model_cfg = model_cfg or model_config(cfg.model)
        self.x, self.y = data if data is not None else training_data(self.model_cfg)
        if tuple(self.x.shape[1:]) != tuple(self.model_cfg.latent_shape):
            raise ValueError(f"data {tuple(self.x.shape[1:])} does not fit the model's latents "
                             f"{tuple(self.model_cfg.latent_shape)}")
        if cfg.batch_size > len(self.x):
            raise ValueError(f"batch_size {cfg.batch_size} > {len(self.x)} training samples")
        self.conditional = self.model_cfg.class_conditional
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            self.model = from_config(self.model_cfg).initialize_weights()
            if self.conditional and cfg.label_embed_std != 0.02:
                torch.nn.init.normal_(self.model.y_embedder.embedding_table.weight, std=cfg.label_embed_std)
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.loss_fn = DiffusionLoss(learn_sigma=self.model_cfg.learn_sigma)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.log: list[LogRow] = []
        self.wall_s = 0.0   # training time so far (all sessions of a resumed run)
        self.cpu_s = 0.0
        self._perm_epoch, self._perm = -1, None
        self._eval = self._eval_batch()

    # ---- schedule and data --------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        frac = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def batch(self, step: int):
        """(x0, t, y, noise) of a step: a slice of the epoch's permutation, with the
        label drop, timesteps and noise from the step's own generator."""
        bs, n = self.cfg.batch_size, len(self.x)
        per_epoch = n // bs
        epoch, k = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.cfg.seed, 1, epoch)))
            self._perm_epoch = epoch
        idx = self._perm[k * bs:(k + 1) * bs]
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, 2, step))
        x0, y = self.x[idx], self.y[idx].clone()
        t = torch.randint(0, self.loss_fn.num_timesteps, (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(bs, generator=g) < self.cfg.class_dropout
        if not self.conditional:
            return x0, t, None, noise
        y[drop] = self.model_cfg.num_classes
        return x0, t, y, noise

    def _eval_batch(self):
        if not self.cfg.eval_every:
            return None
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, 3))
        n = min(self.cfg.eval_size, len(self.x))
        idx = torch.randperm(len(self.x), generator=g)[:n]
        t = torch.randint(0, self.loss_fn.num_timesteps, (n,), generator=g)
        return self.x[idx], t, self.y[idx] if self.conditional else None, torch.randn(self.x[idx].shape, generator=g)

    @torch.no_grad()
    def eval_loss(self, model=None) -> dict[str, float]:
        """Loss of `model` (default: the raw weights) on the fixed evaluation batch
        (same images, t and noise at every evaluation): a smooth training curve."""
        model = model or self.model
        was = model.training
        model.eval()
        try:
            terms = self.loss_fn(model, *self._eval)
        finally:
            model.train(was)
        return {k: float(v.mean()) for k, v in terms.items()}

    # ---- one step -------------------------------------------------------------------
    def train_step(self) -> LogRow:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        lr = self.lr_at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x0, t, y, noise = self.batch(self.step)
        terms = self.loss_fn(self.model, x0, t, y, noise)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            gn = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        else:
            gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.model.parameters()
                                                             if p.grad is not None])))
        self.opt.step()
        self.update_ema()
        self.step += 1
        self.wall_s += time.perf_counter() - t0
        self.cpu_s += _cpu_seconds() - c0
        row = LogRow(self.step, float(loss.detach()), float(terms["mse"].detach().mean()),
                     float(terms["vb"].detach().mean()) if "vb" in terms else float("nan"), lr, gn,
                     round(self.wall_s, 3), round(self.cpu_s, 3))
        if self.cfg.eval_every and (self.step % self.cfg.eval_every == 0 or self.step == 1):
            ev = self.eval_loss()
            row.eval_loss, row.eval_mse = ev["loss"], ev["mse"]
        self.log.append(row)
        return row

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = d * ema + (1 - d) * model, d = min(ema_decay, (1 + step) / (10 + step))."""
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)

    def run(self, steps: int | None = None, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 100, progress: bool = True) -> "Trainer":
        """Trains up to `steps` total steps (default cfg.steps), checkpointing every
        `checkpoint_every` steps and at the end when `checkpoint` is given."""
        steps = self.cfg.steps if steps is None else steps
        bar = TrainProgress(self.cfg.model, steps, enabled=progress)
        while self.step < steps:
            row = self.train_step()
            bar(row)
            if checkpoint and (self.step % checkpoint_every == 0 or self.step == steps):
                self.save(checkpoint)
        bar.close()
        return self

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": "skipdit_fast.train/1", "train_config": asdict(self.cfg),
                "model_config": asdict(self.model_cfg), "model_class": MODEL_CLASSES[type(self.model_cfg)].__name__,
                "step": self.step,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "log": [asdict(r) for r in self.log],
                "wall_s": self.wall_s, "cpu_s": self.cpu_s}

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:   # a checkpoint is never half-written
            torch.save(self.state_dict(), tmp)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != "skipdit_fast.train/1":
            raise ValueError("not a skipdit_fast.train checkpoint")
        kind = MODEL_CLASSES[type(self.model_cfg)].__name__
        if sd["model_config"] != asdict(self.model_cfg) or sd.get("model_class", "DiT") != kind:
            raise ValueError(f"checkpoint model {sd.get('model_class', 'DiT')} {sd['model_config']} != "
                             f"{kind} {asdict(self.model_cfg)}")
        mine = {k: v for k, v in asdict(self.cfg).items() if k != "steps"}
        theirs = {k: v for k, v in sd["train_config"].items() if k != "steps"}
        if mine != theirs:
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            raise ValueError(f"checkpoint was trained with other settings (checkpoint, now): {diff}")
        self.model.load_state_dict(sd["model"], strict=True)
        self.ema.load_state_dict(sd["ema"], strict=True)
        self.opt.load_state_dict(sd["opt"])
        self.step = int(sd["step"])
        self.log = [LogRow(**r) for r in sd["log"]]
        self.wall_s, self.cpu_s = float(sd["wall_s"]), float(sd["cpu_s"])

    def load(self, path) -> "Trainer":
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return self

    # ---- outputs -------------------------------------------------------------------------
    def export(self, path, dtype: torch.dtype = torch.float16) -> None:
        """The EMA weights as safetensors (official keys), with the model config in
        the metadata (load_pretrained reads it)."""
        from safetensors.torch import save_file

        sd = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in self.ema.state_dict().items()}
        meta = {**config_metadata(self.model_cfg), "name": self.cfg.model,
                "train_config": json.dumps(asdict(self.cfg)), "step": str(self.step)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata=meta)

    def write_logs(self, stem, extra: dict | None = None) -> None:
        """<stem>.csv (one row per step) and <stem>.json (settings, times, final losses)."""
        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in fields(LogRow)]
        with atomic_path(f"{stem}.csv", suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(names)
                for r in self.log:
                    w.writerow([_fmt(getattr(r, n)) for n in names])
        tail = self.log[-50:]
        summary = {
            "model": self.cfg.model, "train_config": asdict(self.cfg), "model_config": asdict(self.model_cfg),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step, "wall_s": round(self.wall_s, 1), "cpu_s": round(self.cpu_s, 1),
            "mean_loss_last_50": float(np.mean([r.loss for r in tail])) if tail else None,
            "mean_mse_last_50": float(np.mean([r.mse for r in tail])) if tail else None,
            "eval": [{"step": r.step, "loss": r.eval_loss, "mse": r.eval_mse}
                     for r in self.log if not math.isnan(r.eval_loss)],
            "machine": machine_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
        summary.update(extra or {})
        write_atomic(f"{stem}.json", json.dumps(summary, indent=1) + "\n")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


class TrainProgress:
    """A progress line on stderr: step, smoothed loss, it/s, ETA (redrawn in place on a
    terminal, every 5% otherwise)."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0, self.first, self.smooth, self.last_bucket = time.perf_counter(), None, None, -1

    def __call__(self, row: LogRow) -> None:
        self.smooth = row.loss if self.smooth is None else 0.95 * self.smooth + 0.05 * row.loss
        if not self.enabled:
            return
        if self.first is None:
            self.first = row.step - 1
        bucket = 20 * row.step // self.total
        if not self.tty and bucket == self.last_bucket and row.step != self.total:
            return
        self.last_bucket = bucket
        el = time.perf_counter() - self.t0
        done = row.step - self.first
        rate = done / el if el > 0 else 0.0
        eta = (self.total - row.step) / rate if rate > 0 else float("nan")
        n = 30 * row.step // self.total
        line = (f"{self.label} [{'#' * n}{'.' * (30 - n)}] {row.step}/{self.total} loss {self.smooth:.4f} "
                f"(mse {row.mse:.4f}) {rate:.2f} it/s eta {eta / 60:.1f} min")
        self.stream.write("\r" + line if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


# ---------------------------------------------------------------------------------
# the shipped weights

def default_train_config(name: str) -> TrainConfig:
    """The recipe of a shipped model: TrainConfig's defaults for the image pair; for
    the video pair (8 frames of 16 tokens each) batches of 32 clips and 2400 steps:
    about 14 minutes per model with one thread on 2 nearly idle cores (the logs)."""
    if name in VIDEO_MODELS:
        return TrainConfig(model=name, steps=VIDEO_STEPS, batch_size=VIDEO_BATCH)
    return TrainConfig(model=name)


VIDEO_STEPS, VIDEO_BATCH = 2400, 32


def train_default(out_dir: Path = WEIGHTS_DIR, work_dir: Path = Path("build/train"), steps: int | None = None,
                  resume: bool = True, progress: bool = True, names=tuple(SHIPPED), classifier: bool = True) -> dict:
    """Trains the shipped pairs (each pair: same seed, steps and batch) and the digit
    classifiers; writes <out_dir>/<name>.safetensors, their logs (<name>.train.csv /
    .json), digit-classifier.safetensors (when an image model is trained) and
    frame-classifier.safetensors (when a video model is). Checkpoints in work_dir let
    an interrupted run resume."""
    from ..evaluation.digits import DigitClassifier, FRAME_CLASSIFIER, fit_frame_classifier

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in names:
        cfg = default_train_config(name)
        if steps is not None:
            cfg.steps = steps
        tr = Trainer(cfg)
        ckpt = work_dir / f"{name}.pt"
        if resume and ckpt.exists():
            tr.load(ckpt)
            print(f"{name}: resumed at step {tr.step} from {ckpt}", file=sys.stderr)
        load0 = machine_info().get("load_average")
        tr.run(checkpoint=ckpt, progress=progress)
        tr.export(weights_path(name) if out_dir == WEIGHTS_DIR else out_dir / f"{name}.safetensors")
        tr.write_logs(out_dir / f"{name}.train", extra={"load_average_at_start": load0})
        results[name] = {"steps": tr.step, "wall_s": round(tr.wall_s, 1), "cpu_s": round(tr.cpu_s, 1),
                         "loss_last_50": float(np.mean([r.loss for r in tr.log[-50:]]))}
        print(f"{name}: {tr.step} steps in {tr.wall_s / 60:.1f} min wall, {tr.cpu_s / 60:.1f} min CPU "
              f"(load average {machine_info().get('load_average')})", file=sys.stderr)
    if classifier and any(n in PAIRS["image"] for n in names):
        clf = DigitClassifier.fit(seed=0)
        clf.save(out_dir / "digit-classifier.safetensors")
        print(f"digit classifier: {100 * clf.test_accuracy:.1f}% on held-out real digits", file=sys.stderr)
    if classifier and any(n in PAIRS["video"] for n in names):
        clf = fit_frame_classifier(VIDEO_MODELS[PAIRS["video"][1]])
        clf.save(out_dir / FRAME_CLASSIFIER)
        print(f"frame classifier: {100 * clf.test_accuracy:.1f}% on frames of held-out moving digits", file=sys.stderr)
    write_atomic(out_dir / "README.md", _weights_readme(out_dir))
    return results


def _weights_readme(out_dir: Path) -> str:
    """The weights folder's README from the logs and files that are there."""
    from ..evaluation.digits import DigitClassifier, FRAME_CLASSIFIER

    results = {}
    for name in SHIPPED:
        log = out_dir / f"{name}.train.json"
        if log.exists():
            j = json.loads(log.read_text())
            results[name] = {"steps": j["steps"], "wall_s": j["wall_s"], "cpu_s": j["cpu_s"],
                             "loss_last_50": j["mean_loss_last_50"], "load": j.get("load_average_at_start"),
                             "threads": j.get("threads"), "batch": j["train_config"]["batch_size"]}

    def accuracy(fn):
        path = out_dir / fn
        return DigitClassifier.load(path).test_accuracy if path.exists() else float("nan")

    lines = ["# Shipped weights (written by `make train-default`, skipdit_fast/apps/train.py)", "",
             "Two pairs, each identical in config except the long skips and trained with the same seed, "
             "steps and batches (EMA weights in fp16; load with "
             "`skipdit_fast.pretrained.load_pretrained(name)`):", "",
             "- tiny DiT / Skip-DiT, class-conditional, on scikit-learn's digits (16x16x1, bilinearly upsampled "
             f"from 8x8): `{json.dumps(TINY)}`;",
             "- tiny Latte / Latte-skip, class-conditional, on moving digits (skipdit_fast/data/moving_digits.py: "
             "8 frames of 16x16x1, each 8x8 digit sliding and bouncing; patch 4): "
             f"`{json.dumps(TINY_VIDEO)}`.", "",
             "| file | steps | batch | threads | wall (min) | CPU (min) | load average at start | "
             "mean loss, last 50 steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in SHIPPED:
        if name not in results:
            continue
        r = results[name]
        lines.append(f"| {name}.safetensors | {r['steps']} | {r['batch']} | {r['threads']} | {r['wall_s'] / 60:.1f} | "
                     f"{r['cpu_s'] / 60:.1f} | {r['load']} | {r['loss_last_50']:.4f} |")
    lines += ["", "Times are measured on a shared machine (the load average says how shared): an idle "
              "machine of the same kind is faster."]
    lines += ["", "digit-classifier.safetensors: a small CNN (skipdit_fast/evaluation/digits.py), "
              f"{100 * accuracy('digit-classifier.safetensors'):.1f}% on its held-out split of the real digits.",
              "", f"{FRAME_CLASSIFIER}: the same CNN trained on the frames of moving digits, "
              f"{100 * accuracy(FRAME_CLASSIFIER):.1f}% on the frames of clips of held-out digits.",
              "", "Training logs: `<name>.train.csv` (per step) and `<name>.train.json` (settings, times, "
              "machine and load average, the fixed-batch evaluation curve).", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import positive_float, positive_int, seed_int

    p.add_argument("--default", action="store_true", help="train the shipped models into skipdit_fast/weights/")
    p.add_argument("--model", default="tiny-skipdit", choices=tuple(SHIPPED))
    p.add_argument("--only", choices=tuple(SHIPPED), nargs="+", help="with --default: train only these")
    p.add_argument("--no-classifier", action="store_true", help="with --default: do not (re)fit the classifiers")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's, the core count)")
    p.add_argument("--steps", type=positive_int,
                   help="total steps (default: the model's recipe, default_train_config)")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=seed_int)
    p.add_argument("--out", help="output folder (default runs/train; not with --default)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--no-progress", action="store_true")


def _resume(tr: Trainer, ckpt: Path) -> None:
    """tr.load(ckpt), a checkpoint that cannot be resumed said as a UsageError (the
    file read and the settings check are all that is inside the try)."""
    import pickle

    from .common import UsageError

    if ckpt.stat().st_size == 0:
        raise UsageError(f"--out: checkpoint {ckpt} is empty; remove it or pass --no-resume to start over")
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as e:
        raise UsageError(f"--out: checkpoint {ckpt} is not readable, truncated or corrupt ({type(e).__name__}); "
                         "remove it or pass --no-resume to start over") from None
    try:
        tr.load_state_dict(sd)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--out: checkpoint {ckpt} does not resume this run ({e}); pass --no-resume to "
                         "start over, or another --out") from None


def main(args: argparse.Namespace) -> int:
    from .common import UsageError, check_output_dir

    if args.default:
        given = [f for f, v in (("--out", args.out), ("--batch-size", args.batch_size), ("--lr", args.lr),
                                ("--seed", args.seed)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: not with --default (it trains the shipped recipes into "
                             f"{WEIGHTS_DIR}); leave them out, or drop --default")
    else:
        given = [f for f, v in (("--only", args.only), ("--no-classifier", args.no_classifier or None))
                 if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --default")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.default:
        check_output_dir(str(WEIGHTS_DIR), "--default (skipdit_fast/weights)")
        train_default(steps=args.steps, resume=not args.no_resume, progress=not args.no_progress,
                      names=args.only or tuple(SHIPPED), classifier=not args.no_classifier)
        return 0
    cfg = default_train_config(args.model)
    for k in ("steps", "batch_size", "lr", "seed"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    out = Path(args.out or "runs/train")
    check_output_dir(str(out), "--out")   # before the training, not after it
    try:
        tr = Trainer(cfg)
    except ValueError as e:   # a batch larger than the data, ...
        raise UsageError(f"--batch-size: {e}" if "batch_size" in str(e) else str(e)) from None
    ckpt = out / f"{args.model}.pt"
    if ckpt.exists() and not args.no_resume:
        _resume(tr, ckpt)
        print(f"resumed at step {tr.step} from {ckpt}", file=sys.stderr)
    tr.run(checkpoint=ckpt, progress=not args.no_progress)
    tr.export(out / f"{args.model}.safetensors")
    tr.write_logs(out / f"{args.model}.train")
    print(f"{args.model}: {tr.step} steps, {tr.wall_s:.0f} s wall, {tr.cpu_s:.0f} s CPU; wrote {out}", file=sys.stderr)
    return 0
