"""The qpeft command: info reports the build, demo fine-tunes end to end and the loss goes down."""

import json
import subprocess
import sys

import pytest

from qpeft import cli
from qpeft.tuners import registry


def test_info(capsys):
    assert cli.main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["build"]["version"] == report["qpeft"] and "cpu_features" in report


@pytest.mark.parametrize("method", registry.names())
def test_demo_runs_and_learns(capsys, method):
    pytest.importorskip("transformers")
    assert cli.main(["demo", "--steps", "12", "--seq", "48", "--quiet", "--device", "cpu", "--method", method]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert result["steps"] == 12 and result["method"] == method
    assert result["loss_last_10_mean"] < result["loss_first"]
    assert "trainable params" in out


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "qpeft.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "qpeft demo" in done.stdout
