"""Helpers for the kit's tests: run the toy trainer in fresh processes and compare what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "tests" / "toy_trainer.py"


def env() -> dict:
    """Environment for child processes: one thread each, no terminal, project importable."""
    result = dict(os.environ)
    result.update({"OMP_NUM_THREADS": "1", "CI": "1", "PYTHONPATH": str(ROOT)})
    return result


def run_toy(run_dir: Path, *args: str, nproc: int = 1, check: bool = True, timeout: int = 240,
            **popen) -> subprocess.CompletedProcess:
    """Run the toy trainer (``torchrun`` when ``nproc`` > 1) and return the completed process."""
    if nproc == 1:
        command = [sys.executable, str(TOY)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + os.getpid() % 1000), str(TOY)]
    command += ["--run-dir", str(run_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"toy trainer failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def losses(run_dir: Path) -> list[float]:
    """Per-step losses the toy trainer wrote."""
    return json.loads((run_dir / "losses.json").read_text())


def final(run_dir: Path, rank: int = 0) -> dict:
    """Final model, EMA and optimizer state of one rank."""
    return torch.load(run_dir / f"final_rank{rank}.pth", weights_only=True)


def assert_state_equal(a, b, where: str = "state") -> None:
    """Recursive ``torch.equal`` on nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where} keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where} lengths differ"
        for index, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def mat_bytes(run_dir: Path) -> dict[str, bytes]:
    """Every ``.mat`` dump of a run, by name."""
    return {path.name: path.read_bytes() for path in sorted((run_dir / "loss").glob("*.mat"))}
