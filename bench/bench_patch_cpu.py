"""skipdit_fast.patch + enable_skip_cache on the CPU: the time of one sampling run's
model calls for small random-weight models, unpatched / patched / cached / patched +
cached, and of a whole tiny HunyuanDiTPipeline call (classifier-free guidance).

    PYTHONPATH=. python bench/bench_patch_cpu.py [--threads 1] [--repeats 3] [--steps 20]

Models (fp32, random weights, built locally; diffusers 0.42.1):
  hunyuan-tiny   HunyuanDiT2DModel as in the tests: 10 layers, D 32 (2 x 16 heads),
                 16 image tokens, 5 + 7 text tokens, batch 2
  hunyuan-small  HunyuanDiT2DModel, 16 layers, D 352 (4 heads x 88, HunyuanDiT's head
                 dim), 64 image tokens, 77 + 256 text tokens (the pipeline's), batch 2 (CFG)
  skipdit-small  the official Skip-DiT code layout (tests/official_layouts.py): depth 12,
                 D 384 (6 x 64), 64 tokens, batch 4 (patch only: enable_skip_cache drives
                 our DiT and HunyuanDiT, not the official class)
  pipeline-tiny  HunyuanDiTPipeline with the hunyuan-tiny transformer, tiny BERT / T5 /
                 VAE, 64 px, CFG 5, DDPM
A run is `steps` model calls at timesteps 999 .. 0 on fixed inputs (the pipeline: one
__call__). Variants are interleaved per repeat so load changes hit all alike; the best
wall-clock and process CPU time of each is kept (on a shared machine CPU time is the
steadier measure for a single-threaded run). Skip-Cache: interval 2, branch 2 (K is
bounded by the long skips: 4 for 10 layers, 7 for 16).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch

import skipdit_fast

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def transformer_case(name, make, inputs, steps, interval, branch, cache=True):
    base = make()
    variants = {"unpatched": base}
    patched = copy.deepcopy(base)
    skipdit_fast.patch(patched)
    variants["patched"] = patched
    caches = {}
    if cache:
        cached = copy.deepcopy(base)
        caches["cached"] = skipdit_fast.enable_skip_cache(cached, interval=interval, branch=branch)
        variants["cached"] = cached
        both = copy.deepcopy(base)
        skipdit_fast.patch(both)
        caches["patched+cached"] = skipdit_fast.enable_skip_cache(both, interval=interval, branch=branch)
        variants["patched+cached"] = both
    timesteps = torch.linspace(999, 0, steps)

    def run(model):
        with torch.no_grad():
            for t in timesteps:
                inputs(model, float(t))

    return name, variants, run, caches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--only", nargs="*", help="case names")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers
    import diffusers_models as M
    import official_layouts as OL
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    cases = []

    def hy_call(x, kw):
        def call(model, t):
            return model(x, torch.full((x.shape[0],), t), **kw)
        return call

    x, _, kw = M.hunyuan_inputs()
    cases.append(transformer_case("hunyuan-tiny", lambda: M.hunyuan(num_layers=10), hy_call(x, kw),
                                  args.steps, 2, 2))
    small = dict(num_attention_heads=4, attention_head_dim=88, hidden_size=352, sample_size=16,
                 text_len=77, text_len_t5=256)
    xs, _, kws = M.hunyuan_inputs(size=16, text_len=77, text_len_t5=256)
    kws["image_rotary_emb"] = get_2d_rotary_pos_embed(88, ((0, 0), (8, 8)), (8, 8), output_type="pt")
    cases.append(transformer_case("hunyuan-small", lambda: M.hunyuan(num_layers=16, **small), hy_call(xs, kws),
                                  args.steps, 2, 2))
    xd = OL.dit_inputs(batch=4, size=16)
    cases.append(transformer_case(
        "skipdit-small", lambda: OL.OfficialDiT(input_size=16, hidden_size=384, depth=12, num_heads=6).eval(),
        lambda model, t: model(xd[0], torch.full((4,), int(t)), xd[2]), args.steps, 2, 2, cache=False))
    pipe = M.hunyuan_pipeline(num_layers=10)
    pipe_fast = copy.deepcopy(pipe)
    skipdit_fast.patch(pipe_fast)
    pipe_cache = skipdit_fast.enable_skip_cache(pipe_fast, interval=2, branch=2)
    cases.append(("pipeline-tiny", {"unpatched": pipe, "patched+cached": pipe_fast},
                  lambda pp: M.run_pipeline(pp, steps=args.steps), {"patched+cached": pipe_cache}))
    if args.only:
        cases = [c for c in cases if c[0] in args.only]

    results = {}
    for name, variants, run, _ in cases:
        for model in variants.values():
            run(model)  # warm-up (and the backend choices)
        results[name] = {v: ([], []) for v in variants}
    for rep in range(args.repeats):
        for name, variants, run, _ in cases:
            for v, model in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run(model)
                results[name][v][0].append(time.perf_counter() - t0)
                results[name][v][1].append(time.process_time() - c0)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    load = os.getloadavg()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, {args.threads} thread(s), {args.steps} steps, best of "
          f"{args.repeats}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a shared machine: "
          "other jobs inflate wall time)")
    print(f"{'case':14s} {'variant':15s} {'wall s':>8s} {'speedup':>8s} {'cpu s':>8s} {'speedup':>8s}  cache")
    for name, variants, _, caches in cases:
        base_w, base_c = (min(x) for x in results[name]["unpatched"])
        for v in variants:
            w, c = (min(x) for x in results[name][v])
            note = ""
            if v in caches:
                r = caches[v].report()
                note = f"{r.full_steps} full / {r.cached_steps} cached, ideal {r.ideal_speedup:.2f}x"
            print(f"{name:14s} {v:15s} {w:8.3f} {base_w / w:7.2f}x {c:8.3f} {base_c / c:7.2f}x  {note}")


if __name__ == "__main__":
    main()
