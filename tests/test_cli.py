"""`skipdit-fast info` (also python -m skipdit_fast): versions, build, backends."""

import json
import subprocess
import sys

from skipdit_fast.apps import info

from skipdit_fast.ops import backends


def test_info_text_names_every_op_and_backend():
    text = info.format_text(info.collect())
    for op in backends.OPS:
        assert op in text
    for name in backends.BACKENDS:
        assert name in text
    assert "native library" in text and "torch" in text


def test_info_has_a_status_for_every_backend():
    data = info.collect()
    for op, per_dev in data["backends"].items():
        for dev, row in per_dev.items():
            for name, status in row["backends"].items():
                assert status, (op, dev, name)


def test_python_m_info_json():
    out = subprocess.run([sys.executable, "-m", "skipdit_fast", "info", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["library"]["loaded"] is True
    assert set(data["backends"]) == set(backends.OPS)
