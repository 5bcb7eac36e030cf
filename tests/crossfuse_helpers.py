"""Helpers for the CrossFuse trainer tests: the shared demo dataset, tiny runs in fresh processes, log parsing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.kit_helpers import ROOT, env

TRAINER = ROOT / "train_end_to_end.py"
# A shortened demo: 24 pairs at 32x32, batch 4 -> 6 iterations per epoch, 2 epochs; log windows of 4 iterations,
# so every epoch ends with a partial window (4, 6 | 8, 12), and no TensorBoard unless a test asks for it.
TINY = ("--epochs", "2", "--train-num", "24", "--height", "32", "--width", "32", "--step", "4", "--no-tensorboard",
        "--save-every", "1", "--checkpoint-every", "0")
ITERS_PER_EPOCH = 6
CTIME = r".{24}"
POSITION = r"Epoch (?P<epoch>\d+)/(?P<epochs>\d+) - Batch (?P<batch>\d+)/(?P<iters>\d+)"
FUSION_LINE = re.compile(
    rf"^(?P<prefix>🔄 E2E|FUSION) - {CTIME} - {POSITION}"
    r" - lr:(?P<lr>\d\.\d{6}) - temp:(?P<temp>\d\.\d{4}) - pix loss: (?P<pix_loss>\S+) - gra loss: (?P<gra_loss>\S+)"
    r" - ssim loss: (?P<ssim_loss>\S+) - total loss: (?P<loss_data>\S+)$"
)
AE_LINE = re.compile(
    rf"^AE\[(?P<modality>ir|vi)\] - {CTIME} - {POSITION}"
    r" - lr:(?P<lr>\d\.\d{6}) - recon loss: (?P<recon_loss>\S+) - ssim loss: (?P<ssim_loss>\S+)"
    r" - total loss: (?P<loss_data>\S+)$"
)


def demo_root(tmp_path_factory) -> Path:
    """The demo dataset of seed 0, generated once per test session (concurrency-safe, idempotent)."""
    from common.ivif.demo import ensure_ivif_demo

    return ensure_ivif_demo(tmp_path_factory.getbasetemp() / "ivif_demo", 0)


def run_trainer(save_dir: Path, data: Path, *args: str, nproc: int = 1, check: bool = True,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `train_end_to_end.py` (under torchrun for `nproc` > 1) with the demo data and outputs under `save_dir`."""
    if nproc == 1:
        command = [sys.executable, str(TRAINER)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29700 + os.getpid() % 200), str(TRAINER)]
    command += ["--data.demo-root", str(data), "--save-dir", str(save_dir), "--eval.out", str(save_dir / "output"),
                *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout, cwd=save_dir.parent)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def log_lines(stdout: str, pattern: re.Pattern) -> list[dict]:
    """Parsed log lines of one pattern, in order."""
    return [match.groupdict() for line in stdout.splitlines() if (match := pattern.match(line))]


def without_time(lines: list[str]) -> list[str]:
    """Log lines with the 24-character ctime field blanked (for comparing two runs)."""
    return [re.sub(rf" - {CTIME} - Epoch", " - <time> - Epoch", line) for line in lines]


def mtimes(folder: Path) -> dict[str, int]:
    """Modification times (ns) of every file under `folder`."""
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in files}
