"""`skipdit-fast evaluate`: scores a samples.npz of `sample-many` (the ADM layout:
`arr_0` uint8 [N, H, W, C] or videos [N, F, H, W, C], `arr_1` labels).

    skipdit-fast evaluate samples/samples.npz                 # digit models: accuracy, FD
    skipdit-fast evaluate a/samples.npz --ref b/samples.npz   # PSNR / SSIM of matched samples

One set, samples of the shipped digit models (16x16x1 images; videos of 16x16x1
frames): the digit classifier's accuracy (does sample i look like its class arr_1[i];
videos: every frame against its video's class, the frame classifier) and the Frechet
distance of its penultimate features to those of the real digits (all 1797; videos:
all frames of the moving-digit clips) — the scores of bench/fidelity.py
(evaluation.digits.scores). Two sets (--ref): PSNR and SSIM between sample i of one
and sample i of the other (evaluation.metrics; videos frame by frame), e.g. cached
vs uncached runs of the same seeds. ImageNet samples have no classifier here: run
the ADM evaluator on them (README, "Sampling at scale").
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile

CHUNK = 256  # samples per chunk of the pairwise metrics (bounded memory on 50k ImageNet samples)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("samples", help="a .npz with arr_0 (uint8 N x H x W x C, videos N x F x H x W x C)")
    p.add_argument("--ref", help="a second .npz of the same shape: PSNR / SSIM between matched samples")
    p.add_argument("--json", help="also write the numbers to this JSON file")


def load_samples(path: str):
    """(arr_0 uint8 array, arr_1 labels or None) of a samples .npz."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files) if hasattr(z, "files") else []
            x = z["arr_0"] if "arr_0" in files else None
            y = z["arr_1"] if "arr_1" in files else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if x is None:
        raise ValueError(f"{path}: no arr_0 (not a samples .npz in the ADM layout)")
    if x.dtype != np.uint8 or x.ndim not in (4, 5):
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x C (or N x F x H x W x C), got {x.dtype} "
                         f"{list(x.shape)}")
    if y is not None and y.shape != (len(x),):
        raise ValueError(f"{path}: arr_1 must hold one label per sample ({len(x)}), got shape {list(y.shape)}")
    return x, y


def as_unit(x):
    """uint8 channels-last -> float [0, 1] channels at dim -3 (torch)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.moveaxis(x, -1, -3).astype(np.float32) / 255.0)


def digit_scores(x, labels) -> dict:
    """Accuracy and FD of digit samples (see the module docstring)."""
    from ..evaluation.digits import DigitClassifier, default_classifier_path, frame_classifier_path, real_samples
    from ..evaluation.digits import scores

    video = x.ndim == 5
    shape = x.shape[-3:]
    clf_path = frame_classifier_path() if video else default_classifier_path()
    clf = DigitClassifier.load(clf_path)
    if shape[0] != shape[1] or shape != (clf.size, clf.size, 1):
        raise ValueError(f"samples of {'x'.join(map(str, x.shape[1:]))} are not the shipped digit models' "
                         f"({clf.size}x{clf.size}x1 {'frames' if video else 'images'}): no classifier for them here; "
                         "for ImageNet samples run the ADM evaluator (README, 'Sampling at scale')")
    if len(x) < 2:
        raise ValueError(f"the Frechet distance needs >= 2 samples, got {len(x)}")
    real, _ = real_samples(video, num_frames=x.shape[1] if video else 8, size=clf.size)
    from ..evaluation.digits import as_images

    real_feats = clf.features(as_images(real))
    s = scores(clf, real_feats, as_unit(x) * 2 - 1, labels)
    return {"kind": "video frames" if video else "images", "classifier": clf_path.name,
            "classifier_test_accuracy": clf.test_accuracy, "real_samples": len(real), **s}


def pair_scores(a, b) -> dict:
    """PSNR (one MSE over all pixels) and mean SSIM between a[i] and b[i]."""
    from ..evaluation.metrics import psnr_from_mse, ssim

    if a.shape != b.shape:
        raise ValueError(f"the two sets must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    sse = ssim_sum = 0.0
    pixels = 0
    for k in range(0, len(a), CHUNK):
        xa, xb = as_unit(a[k:k + CHUNK]), as_unit(b[k:k + CHUNK])
        if xa.dim() == 5:
            xa, xb = xa.reshape(-1, *xa.shape[2:]), xb.reshape(-1, *xb.shape[2:])
        sse += float((xa.double() - xb.double()).square().sum())
        pixels += xa.numel()
        ssim_sum += ssim(xa, xb) * len(xa)
    frames = len(a) * (a.shape[1] if a.ndim == 5 else 1)
    return {"psnr": psnr_from_mse(sse / pixels), "ssim": ssim_sum / frames}


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..files import write_atomic

    def fail(msg: str) -> int:
        print(f"skipdit-fast evaluate: {msg}", file=sys.stderr)
        return 2

    try:
        x, y = load_samples(args.samples)
        res = {"samples": args.samples, "count": len(x), "shape": list(x.shape[1:])}
        if args.ref:
            xr, yr = load_samples(args.ref)
            res.update(ref=args.ref, **pair_scores(x, xr))
            res["same_labels"] = None if y is None or yr is None else bool(np.array_equal(y, yr))
            print(f"{args.samples} vs {args.ref}: {len(x)} matched samples, PSNR {res['psnr']:.2f} dB, "
                  f"SSIM {res['ssim']:.4f}" + ("" if res["same_labels"] is not False else " (labels differ)"))
        else:
            res.update(digit_scores(x, y))
            acc = "no labels (arr_1)" if res["accuracy"] is None else f"accuracy {100 * res['accuracy']:.1f}%"
            print(f"{args.samples}: {len(x)} samples ({res['kind']}), digit classifier {acc}, FD "
                  f"{res['fd']:.2f} to the {res['real_samples']} real ones (classifier features)")
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2) + "\n")
    return 0
