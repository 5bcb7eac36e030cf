"""sRGB <-> CIE LAB (D65) in torch, and the normalised LAB used inside the system (spec/colorize.md §2.1).

Raw LAB has L in [0, 100] and a, b in about [-108, 98] for sRGB colours. Inside the system LAB is normalised:
``L' = (L - 50) / 50``, ``a' = a / 127``, ``b' = b / 127``; the gray image shown to the flow module and to Swin is
``g = L / 100 = (L' + 1) / 2``.

Every function takes channels on dimension -3 (``[..., 3, H, W]``), computes in float32 (float64 inputs stay
float64) with autocast disabled, and has finite gradients everywhere: each fractional power is evaluated on its
argument clamped to the branch threshold, so the branch that ``torch.where`` discards never produces inf or NaN.
"""

from __future__ import annotations

import torch

EOTF_THRESHOLD = 0.04045
OETF_THRESHOLD = 0.0031308
LINEAR_SLOPE = 12.92
GAMMA = 2.4
DELTA = 6.0 / 29.0
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
              (0.212671, 0.715160, 0.072169),
              (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
L_CENTRE = 50.0
L_SCALE = 50.0
AB_SCALE = 127.0


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, device=like.device)


def _apply_matrix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` over the channel dimension (-3) of ``[..., 3, H, W]``."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(x.dtype), x)


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """sRGB EOTF: ``c / 12.92`` up to 0.04045, else ``((c + 0.055) / 1.055) ** 2.4``."""
    power = ((c.clamp(min=EOTF_THRESHOLD) + 0.055) / 1.055) ** GAMMA
    return torch.where(c > EOTF_THRESHOLD, power, c / LINEAR_SLOPE)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    """sRGB OETF, the inverse of :func:`srgb_to_linear` (threshold 0.0031308), without clamping."""
    power = 1.055 * c.clamp(min=OETF_THRESHOLD) ** (1.0 / GAMMA) - 0.055
    return torch.where(c > OETF_THRESHOLD, power, c * LINEAR_SLOPE)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    cube_root = t.clamp(min=DELTA**3) ** (1.0 / 3.0)
    return torch.where(t > DELTA**3, cube_root, t / (3.0 * DELTA**2) + 4.0 / 29.0)


def _lab_f_inverse(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f > DELTA, f**3, 3.0 * DELTA**2 * (f - 4.0 / 29.0))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``[..., 3, H, W]`` -> raw LAB (L in [0, 100])."""
    dtype = _working_dtype(rgb)
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        linear = srgb_to_linear(rgb.to(dtype))
        xyz = _apply_matrix(_matrix(RGB_TO_XYZ, rgb), linear)
        white = torch.tensor(D65_WHITE, dtype=dtype, device=rgb.device).view(3, 1, 1)
        fx, fy, fz = _lab_f(xyz / white).unbind(dim=-3)
        return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Raw LAB ``[..., 3, H, W]`` -> sRGB clamped to [0, 1] (exact inverse matrix, then the OETF)."""
    dtype = _working_dtype(lab)
    with torch.autocast(device_type=lab.device.type, enabled=False):
        lightness, a, b = lab.to(dtype).unbind(dim=-3)
        fy = (lightness + 16.0) / 116.0
        f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim=-3)
        white = torch.tensor(D65_WHITE, dtype=dtype, device=lab.device).view(3, 1, 1)
        xyz = _lab_f_inverse(f) * white
        linear = _apply_matrix(torch.linalg.inv(_matrix(RGB_TO_XYZ, lab)), xyz)
        return linear_to_srgb(linear).clamp(0.0, 1.0)


def normalize_lab(lab: torch.Tensor) -> torch.Tensor:
    """Raw LAB -> normalised LAB ``((L - 50) / 50, a / 127, b / 127)``."""
    scale = lab.new_tensor((L_SCALE, AB_SCALE, AB_SCALE)).view(3, 1, 1)
    shift = lab.new_tensor((L_CENTRE, 0.0, 0.0)).view(3, 1, 1)
    return (lab - shift) / scale


def denormalize_lab(lab_normalized: torch.Tensor) -> torch.Tensor:
    """Normalised LAB -> raw LAB (inverse of :func:`normalize_lab`)."""
    scale = lab_normalized.new_tensor((L_SCALE, AB_SCALE, AB_SCALE)).view(3, 1, 1)
    shift = lab_normalized.new_tensor((L_CENTRE, 0.0, 0.0)).view(3, 1, 1)
    return lab_normalized * scale + shift


def rgb_to_normalized_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> normalised LAB."""
    return normalize_lab(rgb_to_lab(rgb))


def normalized_lab_to_rgb(lab_normalized: torch.Tensor) -> torch.Tensor:
    """Normalised LAB -> sRGB in [0, 1] (the ab channels are used as given; clamp them first where needed)."""
    return lab_to_rgb(denormalize_lab(lab_normalized))


def gray_from_lightness(lightness_normalized: torch.Tensor) -> torch.Tensor:
    """The gray image ``g = L / 100 = (L' + 1) / 2`` from normalised lightness (any shape)."""
    return (lightness_normalized + 1.0) * 0.5


def uint8_to_normalized_lab(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[..., 3, H, W]`` -> float32 normalised LAB."""
    return rgb_to_normalized_lab(rgb_uint8.to(torch.float32) / 255.0)
