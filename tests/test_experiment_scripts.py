"""Every script in experiments/ runs as the README shows it (``python experiments/X.py``, from any
folder, with no PYTHONPATH): ``--help`` exits 0 and writes nothing where it is run."""

import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_the_scripts_are_found():
    assert {"e2e_bench.py", "e2e_table.py", "gsm8k_eval.py", "quickstart.py", "tiny_lm.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs_from_anywhere(script, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
    assert list(tmp_path.iterdir()) == []
