"""`skipdit-fast info` (also python -m skipdit_fast): versions, build, backends."""

import json
import subprocess
import sys

from skipdit_fast import backends, info


def test_info_text_names_every_op_and_backend():
    text = info.format_text(info.collect())
    for op in backends.OPS:
        assert op in text
    for name in backends.BACKENDS:
        assert name in text
    assert "native library" in text and "torch" in text


def test_info_lists_missing_kernels_honestly():
    data = info.collect()
    for op, per_dev in data["backends"].items():
        for dev, row in per_dev.items():
            for name, status in row["backends"].items():
                assert status, (op, dev, name)
                if name == "triton" and not backends._triton_ops.implemented(op):
                    assert "not written yet" in status


def test_python_m_info_json():
    out = subprocess.run([sys.executable, "-m", "skipdit_fast", "info", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["library"]["loaded"] is True
    assert set(data["backends"]) == set(backends.OPS)
