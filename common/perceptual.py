"""Perceptual video metrics (spec/metrics.md §6.5-6.6): LPIPS v0.1 AlexNet in own torch code, and FID.

Both need local weight files and never download anything:

- LPIPS: the backbone is a torchvision AlexNet state dict (``--lpips-backbone``); the five linear heads come
  from ``--lpips-heads`` or from the ``alex.pth`` shipped inside an installed ``lpips`` or ``torchmetrics``
  package, found by its path (the package is not imported).
- FID: pytorch-fid's FID Inception-v3, assembled from pytorch-fid's public blocks and loaded strictly from its
  ``pt_inception-2015-12-05`` file (``--fid-weights``); pool3 features are reduced into float64
  :class:`RunningGaussian` statistics and compared with :func:`frechet_distance`.

A missing weight file raises :class:`WeightsUnavailable`, whose message is the reason the column is omitted;
:meth:`PerceptualModels.load` turns it into a warning.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as functional
from torch import nn

from common.errors import DataError, UserError

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_TAPS = (1, 4, 7, 9, 11)
"""Indices of the AlexNet ``features`` ReLUs whose outputs LPIPS compares."""
ALEXNET_TAP_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_MIN_SIDE = 31
"""The smallest frame side AlexNet's two 3x3 max-pools accept."""
PACKAGED_HEADS = (("lpips", ("weights", "v0.1", "alex.pth")),
                  ("torchmetrics", ("functional", "image", "lpips_models", "alex.pth")))
"""Where installed packages ship the LPIPS v0.1 AlexNet heads, relative to the package folder."""
FID_FEATURES = 2048
FID_INPUT_SIDE = 299
FID_SINGULAR_OFFSET = 1e-6
FID_MAX_IMAGINARY = 1e-3


class WeightsUnavailable(UserError):
    """A perceptual metric cannot run because its local weights are missing; the message says which and why."""


class PerceptualWarning(UserWarning):
    """A perceptual metric is omitted, undefined, or computed on too few samples."""


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    return path


def _load_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A tensor dict from ``path`` (``weights_only``, on the CPU); errors name the file."""
    path = _require_file(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, pickled objects, truncation: all mean "not a usable state dict"
        raise DataError(f"cannot load the {what} file {path} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); pass a state-dict file") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DataError(f"{what} file {path} does not hold a state dict of tensors")
    return state


def _check_keys(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, what: str) -> None:
    """Strict loading: exactly the expected keys, each with the expected shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:10])}{', ...' if len(unexpected) > 10 else ''}")
    if wrong:
        problems.append("wrong shape " + ", ".join(f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
                                                   for key in wrong))
    if problems:
        raise DataError(f"{what} file {path} does not match: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------- LPIPS


class LPIPS(nn.Module):
    """LPIPS v0.1 with an AlexNet backbone (Zhang et al. 2018); weights start random until loaded.

    ``forward(x, y)`` takes ``[N, 3, H, W]`` RGB in [0, 1] and returns ``[N]`` distances.
    """

    def __init__(self) -> None:
        super().__init__()
        # Same indices as torchvision's AlexNet ``features``, so its state dict loads without renaming.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in ALEXNET_TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def load_backbone(self, path: str | Path) -> None:
        """Load a torchvision AlexNet state dict strictly (``classifier.*`` is dropped first).

        Raises:
            DataError: the file is missing, unreadable, or its ``features`` keys or shapes differ.
        """
        state = {key: value for key, value in _load_state_dict(path, "LPIPS backbone").items()
                 if not key.startswith("classifier.")}
        expected = {key: tuple(value.shape) for key, value in self.state_dict().items() if key.startswith("features.")}
        _check_keys(state, expected, Path(path), "LPIPS backbone (torchvision AlexNet)")
        self.features.load_state_dict({key.removeprefix("features."): value for key, value in state.items()})

    def load_heads(self, path: str | Path) -> None:
        """Load the five linear heads ``lin{k}.model.1.weight`` strictly (the lpips package's ``alex.pth``).

        Raises:
            DataError: the file is missing, unreadable, or its keys or shapes differ.
        """
        state = _load_state_dict(path, "LPIPS heads")
        expected = {f"lin{k}.model.1.weight": (1, channels, 1, 1) for k, channels in enumerate(ALEXNET_TAP_CHANNELS)}
        _check_keys(state, expected, Path(path), "LPIPS heads")
        for k, head in enumerate(self.heads):
            head.weight.copy_(state[f"lin{k}.model.1.weight"])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two [N, 3, H, W] tensors of one shape, got {tuple(x.shape)}, "
                             f"{tuple(y.shape)}")
        if min(x.shape[2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS (AlexNet) needs a side of at least {LPIPS_MIN_SIDE} px, got "
                             f"{x.shape[3]}x{x.shape[2]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = self.shift.dtype
            both = torch.cat([x.to(dtype), y.to(dtype)])
            both = (both * 2.0 - 1.0 - self.shift) / self.scale
            distance = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
            taps = iter(self.heads)
            for index, layer in enumerate(self.features):
                both = layer(both)
                if index in ALEXNET_TAPS:
                    unit = both / (torch.sqrt(torch.sum(both * both, dim=1, keepdim=True)) + 1e-10)
                    first, second = unit.chunk(2)
                    distance = distance + next(taps)((first - second) ** 2).mean(dim=(1, 2, 3))
        return distance


def find_packaged_heads() -> Path | None:
    """The LPIPS AlexNet heads file of an installed ``lpips`` or ``torchmetrics``, found without importing it."""
    for package, parts in PACKAGED_HEADS:
        try:
            spec = importlib.util.find_spec(package)  # a top-level name: locates the package, runs nothing
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder).joinpath(*parts)
            if candidate.is_file():
                return candidate
    return None


def load_lpips(backbone: str | Path | None, heads: str | Path | None = None,
               device: str | torch.device = "cpu") -> LPIPS:
    """An LPIPS model with the backbone file and the heads file (default: :func:`find_packaged_heads`).

    Raises:
        WeightsUnavailable: no backbone file given, or no heads file given or installed.
        DataError: a weight file is missing, unreadable or does not match.
    """
    if backbone is None:
        raise WeightsUnavailable("LPIPS omitted: no AlexNet backbone file (pass --lpips-backbone with a "
                                 "torchvision AlexNet state dict; nothing is downloaded)")
    model = LPIPS()
    model.load_backbone(backbone)  # a given file must be valid even when the heads are missing
    heads = heads if heads is not None else find_packaged_heads()
    if heads is None:
        raise WeightsUnavailable("LPIPS omitted: no heads file (pass --lpips-heads with the lpips package's "
                                 "weights/v0.1/alex.pth, or install lpips or torchmetrics)")
    model.load_heads(heads)
    return model.to(device)


# ---------------------------------------------------------------------------------------------- FID


class FidInception(nn.Module):
    """pytorch-fid's FID Inception-v3 up to pool3: ``[N, 3, H, W]`` RGB in [0, 1] -> ``[N, 2048]`` features.

    Inputs are resized to 299x299 (bilinear, half-pixel) and scaled to [-1, 1], as pytorch-fid does.
    """

    def __init__(self) -> None:
        super().__init__()
        try:
            from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
            from torchvision.models.inception import Inception3
        except ImportError as error:
            raise WeightsUnavailable(f"FID omitted: it needs pytorch-fid and torchvision for the FID Inception "
                                     f"blocks ({error}); pip install pytorch-fid") from error
        # pytorch-fid's fid_inception_v3 without its downloader: torchvision's network, FID blocks swapped in.
        network = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        network.Mixed_5b = FIDInceptionA(192, pool_features=32)
        network.Mixed_5c = FIDInceptionA(256, pool_features=64)
        network.Mixed_5d = FIDInceptionA(288, pool_features=64)
        network.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        network.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        network.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        network.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        network.Mixed_7b = FIDInceptionE_1(1280)
        network.Mixed_7c = FIDInceptionE_2(2048)
        self.network = network
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, path: str | Path) -> None:
        """Load pytorch-fid's ``pt_inception-2015-12-05`` state dict strictly.

        Raises:
            DataError: the file is missing, unreadable, or its keys or shapes differ.
        """
        state = _load_state_dict(path, "FID Inception weights")
        expected = {key: tuple(value.shape) for key, value in self.network.state_dict().items()}
        _check_keys(state, expected, Path(path), "FID Inception weights (pytorch-fid pt_inception-2015-12-05)")
        self.network.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.network
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = functional.interpolate(images.float(), size=(FID_INPUT_SIDE, FID_INPUT_SIDE), mode="bilinear",
                                       align_corners=False)
            x = 2.0 * x - 1.0
            for block in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
                          net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
                          net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                          net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
                x = block(x)
            return torch.mean(x, dim=(2, 3))


def load_fid_inception(weights: str | Path | None, device: str | torch.device = "cpu") -> FidInception:
    """The FID Inception with local weights.

    Raises:
        WeightsUnavailable: no weights file given, or pytorch-fid/torchvision not installed.
        DataError: the weights file is missing, unreadable or does not match.
    """
    if weights is None:
        raise WeightsUnavailable("FID omitted: no Inception weights file (pass --fid-weights with pytorch-fid's "
                                 "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    _require_file(weights, "FID Inception weights")  # before FidInception() can report pytorch-fid missing
    model = FidInception()
    model.load_weights(weights)
    return model.to(device)


class RunningGaussian:
    """Streaming mean and covariance (N - 1) of feature vectors in float64, by Chan's pairwise merge.

    The feature size is set by the first batch.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = np.zeros(0)
        self._scatter = np.zeros((0, 0))  # sum of outer products of the deviations from the mean

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add a batch of ``[N, dim]`` feature vectors."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        batch = np.asarray(features, dtype=np.float64)
        if batch.ndim != 2:
            raise ValueError(f"expected [N, dim] features, got {batch.shape}")
        if batch.shape[0]:
            batch_mean = batch.mean(axis=0)
            centred = batch - batch_mean
            self._merge(batch.shape[0], batch_mean, centred.T @ centred)

    def merge(self, other: RunningGaussian) -> None:
        """Add another accumulator's samples (e.g. gathered from another process)."""
        if other.count:
            self._merge(other.count, other.mean, other._scatter)

    def _merge(self, count: int, mean: np.ndarray, scatter: np.ndarray) -> None:
        if self.count == 0:
            self.count, self.mean, self._scatter = count, mean.copy(), scatter.copy()
            return
        if mean.size != self.mean.size:
            raise ValueError(f"cannot add {mean.size}-d features to {self.mean.size}-d statistics")
        total = self.count + count
        delta = mean - self.mean
        self._scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    @property
    def covariance(self) -> np.ndarray:
        """Sample covariance (divides by N - 1); NaN with fewer than two samples."""
        if self.count < 2:
            return np.full_like(self._scatter, math.nan)
        return self._scatter / (self.count - 1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians.

    A non-finite square root is retried with 1e-6 I added to both covariances; an imaginary part is dropped
    when every diagonal entry's is below 1e-3, otherwise this raises ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Gaussian shapes differ: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = FID_SINGULAR_OFFSET * np.eye(sigma1.shape[0])
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        largest = float(np.max(np.abs(np.diagonal(root).imag)))
        if largest >= FID_MAX_IMAGINARY:
            raise ValueError(f"the covariance square root has an imaginary diagonal part of {largest:.3g}")
        root = root.real
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def fid(predicted: RunningGaussian, reference: RunningGaussian) -> float:
    """FID between two accumulated feature sets; warns below 2048 samples (singular covariance)."""
    smallest = min(predicted.count, reference.count)
    if smallest < 2:
        warnings.warn(f"FID needs at least 2 frames per set, got {smallest}: NaN", PerceptualWarning, stacklevel=2)
        return math.nan
    if smallest < FID_FEATURES:
        warnings.warn(f"FID over {smallest} frames (< {FID_FEATURES}, the feature size): the covariances are "
                      "singular and the value is biased; compare only at equal frame counts",
                      PerceptualWarning, stacklevel=2)
    return frechet_distance(predicted.mean, predicted.covariance, reference.mean, reference.covariance)


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class PerceptualModels:
    """The LPIPS and FID networks a video evaluation uses, and why any requested one is missing."""

    lpips: LPIPS | None = None
    fid: FidInception | None = None
    omitted: dict[str, str] = field(default_factory=dict)
    """Column name (``LPIPS``, ``FID``) -> the reason it is omitted."""

    @classmethod
    def load(cls, metrics: Sequence[str], lpips_backbone: str | Path | None = None,
             lpips_heads: str | Path | None = None, fid_weights: str | Path | None = None,
             device: str | torch.device = "cpu") -> PerceptualModels:
        """Load the networks of the requested ``metrics`` (names ``lpips``, ``fid``) from local files.

        A metric without weights (or without pytorch-fid, for FID) is omitted with a
        :class:`PerceptualWarning` stating why; nothing is downloaded.

        Raises:
            DataError: a given weight file is missing, unreadable or does not match.
        """
        models = cls()
        if "lpips" in metrics:
            try:
                models.lpips = load_lpips(lpips_backbone, lpips_heads, device)
            except WeightsUnavailable as reason:
                models.omitted["LPIPS"] = str(reason)
        if "fid" in metrics:
            try:
                models.fid = load_fid_inception(fid_weights, device)
            except WeightsUnavailable as reason:
                models.omitted["FID"] = str(reason)
        for reason in models.omitted.values():
            warnings.warn(reason, PerceptualWarning, stacklevel=2)
        return models
