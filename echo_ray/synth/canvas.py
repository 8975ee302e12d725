"""Drawing in canonical chest coordinates for the renderer.

`_Frame` maps canonical (u, v) to pixels with the study's pose; `_Layer` draws Pillow lines
and polygons in those coordinates; then soft masks, blur, noise fields, splines, side
mirroring, and the work-size resampling of the smooth fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from echo_ray.synth.findings import Anatomy


class _Frame:
    """Canonical chest coordinates <-> pixels, for one view (the patient pose included)."""

    def __init__(self, size: int, anatomy: Anatomy, magnify: float = 1.0,
                 aspect: float | None = None, rotation: float | None = None) -> None:
        a = anatomy
        th = math.radians(a.rotation if rotation is None else rotation)
        c, s = math.cos(th), math.sin(th)
        sc = a.scale * magnify
        asp = a.aspect if aspect is None else aspect
        self.size = size
        self.m = np.array([[c, -s], [s, c]]) @ np.diag([sc * asp, sc])  # canonical -> [-1, 1]
        self.t = np.array([a.shift_u, a.shift_v])
        self.minv = np.linalg.inv(self.m)
        self.ppu = size / 2 * sc  # pixels per canonical unit (vertical)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (u, v) of every pixel centre, each (size, size) float32."""
        n = self.size
        x = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
        dx = (x - np.float32(self.t[0]))[None, :]
        dy = (x - np.float32(self.t[1]))[:, None]
        mi = self.minv.astype(np.float32)
        return mi[0, 0] * dx + mi[0, 1] * dy, mi[1, 0] * dx + mi[1, 1] * dy

    def px(self, pts) -> np.ndarray:
        """Canonical (..., 2) points -> pixel (x, y) coordinates, same shape."""
        p = np.asarray(pts, dtype=float) @ self.m.T + self.t
        return (p + 1) / 2 * self.size - 0.5

    def width_px(self, w_units: float) -> float:
        return w_units * self.ppu


class _Layer:
    """An image drawn with Pillow (lines, polygons) in canonical coordinates.

    Values in [0, scale] are stored as 8-bit levels (Pillow's "L" mode is an order of
    magnitude cheaper than "F" to create and convert). Pillow replaces pixels rather than
    adding: overlapping structures go to separate layers.
    """

    def __init__(self, frame: _Frame, scale: float = 0.5) -> None:
        self.frame = frame
        self.scale = scale
        self.img = Image.new("L", (frame.size, frame.size), 0)
        self.draw = ImageDraw.Draw(self.img)

    def _level(self, value: float) -> int:
        return max(0, min(255, int(round(value / self.scale * 255))))

    def line(self, pts, width: float, value: float) -> None:
        w = self.frame.width_px(width)
        if w < 1.0:  # sub-pixel: 1 px at proportionally lower density (area antialiasing)
            value, w = value * w, 1.0
        xy = self.frame.px(np.asarray(pts, dtype=float).reshape(-1, 2)).ravel().tolist()
        self.draw.line(xy, fill=self._level(value), width=int(round(w)),
                       joint="curve" if len(xy) > 4 else None)

    def lines_px(self, xy: Sequence[float], width_px: float, value: float) -> None:
        """A line already in pixel coordinates (fast path for many vessel segments)."""
        if width_px < 1.0:
            value, width_px = value * width_px, 1.0
        self.draw.line(xy, fill=self._level(value), width=int(round(width_px)))

    def polygon(self, pts, value: float) -> None:
        xy = self.frame.px(np.asarray(pts, dtype=float).reshape(-1, 2)).ravel().tolist()
        self.draw.polygon(xy, fill=self._level(value))

    def ellipse(self, center, rx: float, ry: float, value: float, outline: float | None = None,
                width: float = 0.0, angle: float = 0.0) -> None:
        t = _CIRCLE
        a = math.radians(angle)
        ex, ey = rx * np.cos(t), ry * np.sin(t)
        pts = np.stack([center[0] + ex * math.cos(a) - ey * math.sin(a),
                        center[1] + ex * math.sin(a) + ey * math.cos(a)], 1)
        if value:
            self.polygon(pts, value)
        if outline is not None:
            self.line(np.vstack([pts, pts[:1]]), width, outline)

    def array(self) -> np.ndarray:
        return np.asarray(self.img).astype(np.float32) * np.float32(self.scale / 255)


_CIRCLE = np.linspace(0, 2 * np.pi, 24, endpoint=False)


def _ramp(x: np.ndarray, w: float) -> np.ndarray:
    """Soft step: 0 for x < -w/2, 1 for x > w/2 (x is a signed distance, inside positive)."""
    return np.clip(x * np.float32(1.0 / w) + np.float32(0.5), 0.0, 1.0)


def _ellipse_sd(u, v, cu, cv, ru, rv, angle_deg: float = 0.0):
    """Approximate signed distance (inside positive) to a rotated ellipse."""
    du, dv = u - np.float32(cu), v - np.float32(cv)
    if angle_deg:
        a = math.radians(angle_deg)
        c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
        du, dv = c * du + s * dv, c * dv - s * du
    r = np.sqrt((du * np.float32(1 / ru)) ** 2 + (dv * np.float32(1 / rv)) ** 2)
    return (1.0 - r) * np.float32(min(ru, rv))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding), float32."""
    if sigma < 0.3:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = img.shape
    p = np.pad(img, ((r, r), (0, 0)), mode="edge")
    out = p[0:h] * k[0]
    for i in range(1, 2 * r + 1):
        out += p[i:i + h] * k[i]
    p = np.pad(out, ((0, 0), (r, r)), mode="edge")
    out = p[:, 0:w] * k[0]
    for i in range(1, 2 * r + 1):
        out += p[:, i:i + w] * k[i]
    return out


def _lowpass(img: np.ndarray, cells: int) -> np.ndarray:
    """Smooth version of img: area-average to cells x cells, bicubic back up."""
    h, w = img.shape
    small = Image.fromarray(img).resize((cells, cells), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field (about unit variance) of size x size from a cells x cells grid."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC),
                      dtype=np.float32)


@lru_cache(maxsize=16)
def _catmull_rom_basis(n: int) -> np.ndarray:
    t = np.linspace(0, 1, n, endpoint=False)
    return 0.5 * np.stack([-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3,
                           t + 4 * t**2 - 3 * t**3, -(t**2) + t**3], 1)  # (n, 4)


def _spline(points: Sequence[Sequence[float]], n: int = 24) -> np.ndarray:
    """Smooth curve through control points (Catmull-Rom), (n * segments + 1, 2)."""
    p = np.asarray(points, dtype=float)
    p = np.vstack([p[:1] * 2 - p[1:2], p, p[-1:] * 2 - p[-2:-1]])
    m = len(p) - 3
    idx = np.arange(m)[:, None] + np.arange(4)[None, :]  # (m, 4) control point windows
    out = np.einsum("nk,mkd->mnd", _catmull_rom_basis(n), p[idx]).reshape(m * n, 2)
    return np.vstack([out, p[-2:-1]])


def _normals(path: np.ndarray) -> np.ndarray:
    d = np.empty_like(path)
    d[1:-1] = path[2:] - path[:-2]
    d[0], d[-1] = path[1] - path[0], path[-1] - path[-2]
    n = np.stack([-d[:, 1], d[:, 0]], 1)
    return n / (np.sqrt((n * n).sum(1, keepdims=True)) + 1e-9)


def _band(path: np.ndarray, width) -> np.ndarray:
    """Polygon of a band of `width` (scalar or per point) around a centre-line."""
    n = _normals(path) * (np.asarray(width, dtype=float).reshape(-1, 1) / 2)
    return np.vstack([path + n, (path - n)[::-1]])


def _mirror(pts, side: str, shift: float = 0.0) -> np.ndarray:
    """Lateral coordinate x (> 0 toward the side's chest wall) -> canonical u."""
    out = np.array(pts, dtype=float).reshape(-1, 2)
    if side == "right":  # the patient's right is the image left
        out[:, 0] = -out[:, 0]
    out[:, 0] += shift
    return out


def _side_sign(side: str) -> float:
    return -1.0 if side == "right" else 1.0


def _sides(side: str | None) -> tuple[str, ...]:
    return ("left", "right") if side == "bilateral" else ((side,) if side else ())


def _work_size(size: int) -> int:
    """Resolution of the smooth fields (body, lungs, heart, opacities): half the output
    from 256 px up, upsampled after; lines, bones and devices are drawn at full size."""
    return size // 2 if size >= 256 else size


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))
    return np.array(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
