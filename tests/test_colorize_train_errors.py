"""Bad input to train_colorize.py (spec/colorize.md §5, §7; DESIGN.md "Bad input"): each case is one `error:` line
naming the file or flag, exit code 2, no traceback, and nothing written or overwritten. In-process (``cli``)."""

from __future__ import annotations

import shutil
import signal

import pytest

from tests.colorize_helpers import no_network, write_tiny_davis  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_network")

DEMO_SIZES = ["--preset", "demo", "--train.time-budget-s", "0", "--train.batch-size", "2", "--train.epochs", "1",
              "--train.no-tensorboard"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_davis(tmp_path_factory.mktemp("colorize_bad") / "tiny", train=2, val=1, frames=4)


@pytest.fixture
def refused(capsys):
    """Run the trainer in-process and return its one error line, checking the exit code and the absence of a
    traceback (the signal handlers and denormal flushing the trainer may set are restored)."""
    import torch

    import train_colorize

    def run(*args: str) -> str:
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        try:
            code = train_colorize.cli(list(args))
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            torch.set_flush_denormal(False)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
        return lines[0]

    return run


def copy_of(data, tmp_path):
    return shutil.copytree(data, tmp_path / "copy")


def run_args(root, out, *extra: str) -> list[str]:
    return [*DEMO_SIZES, "--data.dataset", str(root), "--data.imagenet", str(root / "references"),
            "--train.output-dir", str(out), *extra]


def test_missing_and_empty_dataset_roots(refused, tmp_path):
    out = tmp_path / "run"
    message = refused(*run_args(tmp_path / "nowhere", out))
    assert message == (f"error: data root {tmp_path / 'nowhere'} does not exist or is not a folder "
                       "(check --data.dataset)")
    (tmp_path / "empty").mkdir()
    message = refused(*run_args(tmp_path / "empty", out))
    assert str(tmp_path / "empty") in message and "holds no video sequence" in message
    assert not out.exists()


def test_sequences_shorter_than_the_clip(refused, data, tmp_path):
    out = tmp_path / "run"
    message = refused(*run_args(data, out, "--data.sequence-length", "5"))
    assert "no sequence" in message and "at least 5 frames" in message
    root = copy_of(data, tmp_path)
    for frame in sorted((root / "JPEGImages" / "480p" / "tiny_val_0").iterdir())[2:]:
        frame.unlink()  # a validation sequence of 2 frames: evaluation refuses it
    message = refused(*run_args(root, out))
    assert "tiny_val_0" in message and "2 frames, fewer than 4" in message
    assert not out.exists()


def test_unreadable_frame_and_mixed_sizes(refused, data, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    root = copy_of(data, tmp_path)
    frame = root / "JPEGImages" / "480p" / "tiny_train_1" / "00002.jpg"
    frame.write_bytes(b"not a jpeg")
    message = refused(*run_args(root, out))
    assert str(frame) in message and "not a readable image" in message
    Image.new("RGB", (80, 96)).save(frame)
    message = refused(*run_args(root, out))
    assert str(frame) in message and "80x96" in message and "one size" in message
    assert not out.exists()


def test_reference_folder_without_images(refused, data, tmp_path):
    (tmp_path / "refs").mkdir()
    message = refused(*run_args(data, tmp_path / "run"), "--data.imagenet", str(tmp_path / "refs"))
    assert str(tmp_path / "refs") in message and "holds no images" in message
    assert not (tmp_path / "run").exists()


def test_swintexco_folder_with_a_missing_or_mismatched_file(refused, data, tmp_path):
    import torch

    from colorize.swintexco import WarpNet
    from tests.colorize_helpers import demo_system

    folder = tmp_path / "swintexco"
    folder.mkdir()
    system = demo_system()
    for name in ("embed_net", "colornet"):
        torch.save(getattr(system, name).state_dict(), folder / f"{name}.pth")
    strategy1 = ["--exemplar.swintexco-ckpt", str(folder), "--exemplar.warpnet-width", "0.125"]
    message = refused(*run_args(data, tmp_path / "run"), *strategy1)
    assert str(folder / "nonlocal_net.pth") in message and "lacks nonlocal_net.pth" in message
    torch.save(WarpNet(0.25, system.embed_net.channels).state_dict(), folder / "nonlocal_net.pth")
    message = refused(*run_args(data, tmp_path / "run"), *strategy1)
    assert str(folder / "nonlocal_net.pth") in message and "does not match nonlocal_net" in message
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint(refused, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    state = out / "colorize_step_000001.pth"
    state.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    before = state.read_bytes()
    message = refused(*run_args(data, out), "--resume", str(state))
    assert str(state) in message and "truncated or corrupt" in message
    message = refused("eval", "--checkpoint", str(state))
    assert str(state) in message and "truncated or corrupt" in message
    assert sorted(p.name for p in out.iterdir()) == [state.name] and state.read_bytes() == before


def test_image_size_not_a_multiple_of_32(refused, data, tmp_path):
    message = refused(*run_args(data, tmp_path / "run", "--data.image-size", "80"))
    assert "--data.image-size must be a positive multiple of 32, got 80" in message
