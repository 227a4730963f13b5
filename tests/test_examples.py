"""The scripts under examples/ run as a user would run them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PEFT loaded the adapter" in done.stdout and "step 3: loss" in done.stdout


def test_families_example_runs():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "families.py")], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "export to LoRA r=16" in line]
    assert [line.split(":")[0] for line in lines] == ["VeRA", "RandLoRA", "LoLDU", "DiffuseKronA"]
    assert all("reload gap" in line for line in lines)
