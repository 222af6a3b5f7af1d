"""Every experiment's --smoke runs (fresh processes: each sets up its own devices)."""

import subprocess
import sys
from pathlib import Path

import pytest

# The network testbed builds namespaces (root): slow, kept out of CI.
SLOW = {"edge_testbed.py"}
SCRIPTS = [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
    for name in sorted(p.name for p in (Path(__file__).parents[1] / "experiments").glob("*.py"))
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script, tmp_path):
    root = Path(__file__).parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "experiments" / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|" in done.stdout  # printed its table


def test_demo_main_job(capsys):
    """The README's main job, small: CR = 1 is exact, CR = 4 sends 4x fewer bytes."""
    import json

    from prism_jax import cli

    assert cli.main(["demo", "--samples", "6", "--cr", "1,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    voltage, cr1, cr4 = rows
    assert voltage["strategy"] == "voltage" and cr1["cosine_min"] > 1 - 1e-5
    assert cr4["bytes_per_device"] < cr1["bytes_per_device"] / 3.9
    assert cr4["cosine_mean"] < 1
