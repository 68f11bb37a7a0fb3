"""Every ```python block of README.md runs, so the API the README shows is the API that
exists. New blocks are picked up by themselves. The blocks of one section run in order
in one namespace (a later block may use what an earlier one defined); each section
starts afresh. Tracebacks name the README line.

What cannot run on a small CPU machine is replaced, and only that, by the table
SUBSTITUTIONS below (README text -> what runs here, and why). Each entry must match
at least one block (test_every_substitution_is_used), so the table cannot rot. A
block that shows a diffusers pipeline runs only where diffusers is installed."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (README text, what runs here, why)
SUBSTITUTIONS = [
    ('DiT.from_name("DiT-XL/2-skip")', 'DiT.from_name("DiT-S/8-skip")',
     "a small model of the same family: DiT-XL/2 takes minutes per step on 2 CPU cores"),
    ('.load_checkpoint("DiT-XL-2-skip.pt")', ".load_checkpoint(CHECKPOINT)",
     "a temporary checkpoint of random weights of that model, written as an official .pt state dict"),
    ('Latte.from_name("Latte-XL/2-skip"', 'Latte.from_name("Latte-S/8-skip"',
     "a small Latte-skip of the same layout (16 frames, 32x32 latents: 16 tokens a frame)"),
    ('.load_checkpoint("UCF101-skip.pt")', ".load_checkpoint(CHECKPOINT)",
     "a temporary checkpoint of random weights of that model"),
    ("steps=250", "steps=2", "two sampling steps: one full, one cached (interval 2)"),
    ('HunyuanDiTPipeline.from_pretrained("Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers")', "tiny_hunyuan_pipeline()",
     "the tiny random HunyuanDiTPipeline of tests/diffusers_models.py, built locally (no download)"),
    ('pipe("a red cat on the mat")',
     'pipe("a red cat on the mat", height=64, width=64, num_inference_steps=4, use_resolution_binning=False)',
     "the tiny pipeline's size (64 px, no resizing to 1024 px) and 4 steps"),
]


def blocks() -> list[tuple[str, int, str]]:
    """(section, first line, code) of each ```python block, in README order."""
    text = open(README, encoding="utf-8").read()
    out, section = [], "top"
    # headings, and fenced blocks of any language (a "# ..." line inside one is no heading)
    for m in re.finditer(r"^(#+ [^\n]*)$|^```([\w+-]*)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            section = re.sub(r"[^a-z0-9]+", "-", m.group(1).lstrip("#").strip().lower()).strip("-")
        elif m.group(2) == "python":
            out.append((section, text.count("\n", 0, m.start(3)) + 1, m.group(3)))
    return out


def sections() -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for section, line, code in blocks():
        out.setdefault(section, []).append((line, code))
    return out


def substituted(code: str) -> str:
    for old, new, _ in SUBSTITUTIONS:
        code = code.replace(old, new)
    return code


def test_readme_has_python_blocks():
    assert len(blocks()) >= 4


def test_every_substitution_is_used():
    codes = [code for _, _, code in blocks()]
    for old, _, why in SUBSTITUTIONS:
        assert any(old in c for c in codes), f"SUBSTITUTIONS entry for {old!r} ({why}) matches no README block"


def _namespace(code: str, tmp_path) -> dict:
    ns: dict = {"__name__": "__readme__"}
    if "CHECKPOINT" in code:
        import skipdit_fast

        m = re.search(r'(DiT|Latte)\.from_name\(("[^"]+"[^)]*)\)', code)
        path = tmp_path / "checkpoint.pt"
        torch.manual_seed(0)
        model = eval(f"skipdit_fast.{m.group(1)}.from_name({m.group(2)})", {"skipdit_fast": skipdit_fast})
        torch.save(model.state_dict(), path)
        ns["CHECKPOINT"] = str(path)
    if "tiny_hunyuan_pipeline" in code:
        import diffusers_models

        ns["tiny_hunyuan_pipeline"] = diffusers_models.hunyuan_pipeline
    return ns


@pytest.mark.usefixtures("one_intra_op_thread")
@pytest.mark.parametrize("section", list(sections()))
def test_readme_section_runs(section, tmp_path):
    codes = [(line, substituted(code)) for line, code in sections()[section]]
    if any(re.search(r"^\s*(from|import) diffusers\b", code, re.M) for _, code in codes):
        pytest.importorskip("diffusers")
        pytest.importorskip("transformers")
    ns = _namespace("".join(code for _, code in codes), tmp_path)
    for line, code in codes:
        # padded to its README line, so that a traceback points into README.md
        exec(compile("\n" * (line - 1) + code, README, "exec"), ns)
