"""`skipdit-fast` (also `python -m skipdit_fast`): one entry point, one module per
subcommand. Each module provides add_arguments(parser) and main(args) -> int, and is
imported only when its subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "info": ("skipdit_fast.apps.info", "versions, build, and which backends run here (and why not)"),
    "bench": ("skipdit_fast.benchmark", "kernel and end-to-end benchmarks"),
    "tune": ("skipdit_fast.apps.tune", "measure `auto` for a model's shapes now (cache file; per-candidate table)"),
    "sample": ("skipdit_fast.apps.sample",
               "sample images from a DiT / Skip-DiT or videos from a Latte / Latte-skip, with or without Skip-Cache"),
    "demo": ("skipdit_fast.apps.demo", "the package doing its job on the shipped model (--video: on video)"),
    "train": ("skipdit_fast.apps.train", "train a tiny DiT / Latte (with or without skips), or the shipped models "
              "(--default)"),
    "probe": ("skipdit_fast.apps.probe", "feature stability across steps and error amplification, model vs model"),
    "sample-many": ("skipdit_fast.apps.sample_many", "many samples (FID-50K) on torchrun ranks, resumable, merged npz"),
    "evaluate": ("skipdit_fast.apps.evaluate", "score a samples.npz: digit accuracy / FD, or PSNR / SSIM vs --ref"),
    "calibrate": ("skipdit_fast.apps.calibrate", "a Skip-Cache schedule for a speedup target, from measured errors"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skipdit-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            modules[name] = importlib.import_module(mod)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].main(args) or 0)
    except Exception as e:
        if not _user_error(e):
            raise  # a bug: its traceback is what a report needs
        print(f"skipdit-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _user_error(e: Exception) -> bool:
    """The errors that are the user's to fix, said in one line: UsageError (the apps'
    checks after parsing), a checkpoint that does not fit (CheckpointError), a backend
    that cannot run here (BackendError), a missing input file. Their modules are
    looked up only if imported: an error cannot be of a class nobody imported."""
    from .common import UsageError

    kinds = [UsageError, FileNotFoundError]
    for mod, name in (("skipdit_fast.models.checkpoint", "CheckpointError"), ("skipdit_fast.ops.backends", "BackendError")):
        if mod in sys.modules:
            kinds.append(getattr(sys.modules[mod], name))
    return isinstance(e, tuple(kinds))


def _one_line(e: Exception) -> str:
    text = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"{e.filename}: {e.strerror}"
    return " ".join(text.split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
