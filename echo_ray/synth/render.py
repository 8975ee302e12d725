"""The phantom radiograph: `render_view` turns a `StudySpec` into a float image in [0, 1]
(bright = dense) in which the findings are visible.

Coordinates: a canonical chest frame, u horizontal (-1 image left .. +1 image right) and v
vertical (-1 top .. +1 bottom). Frontal views are shown as radiologists read them: the
patient's RIGHT is on the image LEFT (u < 0). On laterals u runs anterior (-) to posterior (+).
A per-study pose (scale, aspect, tilt, shift) maps the canonical frame onto pixels.

Densities are in "soft-tissue thickness" units: 1 ~ the mid-chest soft-tissue column. The
lungs subtract air from it, bones and metal add to it (`render_frontal`, `render_lateral`);
`_detector` turns the result into a processed radiograph.
"""

from __future__ import annotations

import math

import numpy as np

from echo_ray.synth.canvas import _gaussian_blur, _lowpass
from echo_ray.synth.findings import StudySpec
from echo_ray.synth.render_frontal import _render_frontal
from echo_ray.synth.render_lateral import _render_lateral
from echo_ray.synth.streams import _rng


def render_view(spec: StudySpec, view: str | None = None, image_size: int = 512) -> np.ndarray:
    """Render one view of a study: float32 (image_size, image_size) in [0, 1], bright = dense.

    Anatomy, pose and noise come from streams named by (spec.seed, spec.index, view), each
    finding's own randomness from (..., finding type): rendering the same spec with and
    without a finding differs only by that finding (and, faintly, through the detector's
    image-wide processing).
    """
    view = view or spec.views[0]
    if view in ("PA", "AP"):
        density, devices = _render_frontal(spec, view, image_size)
    elif view in ("LATERAL", "LL"):
        density, devices = _render_lateral(spec, image_size)
    else:
        raise ValueError(f"view must be PA, AP, LATERAL or LL, got {view!r}")
    return _detector(density, devices, spec, view, image_size)


def _detector(d: np.ndarray, devices: np.ndarray | float, spec: StudySpec, view: str,
              size: int) -> np.ndarray:
    """Attenuation -> processed radiograph: quantum noise, detector blur, unsharp masking
    and dynamic-range compression (as CR/DX processing does), a film-like tone curve.

    Devices (metal, radio-opaque plastic) join after the processing, which would otherwise
    ring around them."""
    a = spec.anatomy
    rng = _rng(spec.seed, "noise", spec.index, view, size)
    res = size / 512.0
    # quantum noise grows with attenuation (fewer photons behind dense tissue)
    noise = rng.standard_normal(d.shape, dtype=np.float32)
    d = d + noise * (np.float32(a.noise) * (0.5 + 0.6 * np.minimum(d, 1.6)))
    d = _gaussian_blur(d, a.blur * math.sqrt(res))
    mid = _lowpass(d, 48)
    low = _lowpass(d, 8)
    d = d + 0.8 * (d - mid) - np.float32(a.equalization) * (low - 0.6)
    if isinstance(devices, np.ndarray):
        d = d + _gaussian_blur(devices, 0.7 * a.blur * math.sqrt(res))
    x = (d - np.float32(0.58 + a.exposure)) * np.float32(2.4 * a.contrast)
    # more latitude for dense regions; gamma > 1 darkens the lungs, < 1 brightens them
    x = np.where(x > 0, x * np.float32(0.65 / a.gamma), x * np.float32(a.gamma))
    img = np.float32(0.5) + np.float32(0.5) * np.tanh(x)
    img += noise[::-1] * np.float32(a.noise * 0.25)  # electronic noise (decorrelated)
    return np.clip(img, 0.0, 1.0)
