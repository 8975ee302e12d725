"""The phantom's chest outline in canonical coordinates: lungs, hemidiaphragms, hila, heart
and mediastinum, and on the frontal view the geometry after the findings that move them
(cardiomegaly, mediastinal widening, tension pneumothorax, lobar collapse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from echo_ray.synth.canvas import _ramp, _side_sign, _sides
from echo_ray.synth.findings import CTR_RANGES, MEDIASTINAL_WIDENING, StudySpec

_LUNG_AX, _LUNG_CY, _LUNG_BY = 0.78, 0.35, 1.25  # rib-cage inner ellipse
_DOME_R, _DOME_L = 0.40, 0.46  # hemidiaphragm dome tops (right higher)
_HILUM = {"right": (0.165, -0.03), "left": (0.175, -0.08)}  # (lateral x, v)
_AIR = 0.7  # fraction of the tissue column a full-depth lung replaces with air


def _lung_half_width(v):
    t = (np.asarray(v, dtype=float) - _LUNG_CY) / _LUNG_BY
    return _LUNG_AX * np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


@dataclass
class _Geom:
    """Frontal geometry after the findings that move anatomy (heart size, shift, domes)."""

    ctr: float
    mediastinal_shift: float = 0.0  # + toward the image right (patient's left)
    widening: float = 1.0
    dome: dict[str, float] = field(default_factory=dict)
    ap: bool = False


def _frontal_geom(spec: StudySpec, ap: bool) -> _Geom:
    a = spec.anatomy
    ctr = a.ctr
    if (f := spec.get("cardiomegaly")) is not None:
        ctr = f.params.get("ctr", sum(CTR_RANGES[f.grade]) / 2)
    g = _Geom(ctr=ctr, ap=ap)
    if (f := spec.get("enlarged_cardiomediastinum")) is not None:
        g.widening = f.params.get("widening", sum(MEDIASTINAL_WIDENING[f.grade]) / 2)
    lift = (1.0 - a.inspiration) * 0.5  # shallow inspiration -> higher domes
    g.dome = {"right": _DOME_R - lift, "left": _DOME_L - lift}
    if (f := spec.get("pneumothorax")) is not None and f.params.get("tension"):
        g.mediastinal_shift = -_side_sign(f.side) * 0.09
        g.dome[f.side] += 0.06  # a tension pneumothorax depresses its hemidiaphragm
    if (f := spec.get("atelectasis")) is not None and f.grade == "severe":
        for s in _sides(f.side):
            g.dome[s] -= 0.05  # volume loss elevates the hemidiaphragm
    return g


def _heart_extent(g: _Geom) -> tuple[float, float, float, float]:
    """(top v, bottom v, right extent, left extent) of the cardiac silhouette: its transverse
    diameter (right + left) is the CT ratio times the inner thoracic width, 36% right of the
    midline. AP views magnify the heart."""
    width = g.ctr * 2 * _LUNG_AX * (1.1 if g.ap else 1.0)
    right = 0.36 * width
    return -0.12 - 0.3 * (g.ctr - 0.45), g.dome["left"] + 0.1, right, width - right


def _heart_mask(u, v, g: _Geom, edge: float):
    """Soft cardiac silhouette with an ellipsoid-like thickness profile."""
    top, bottom, right, left = _heart_extent(g)
    s = np.clip((v - top) * (1 / (bottom - top)), 0.0, 1.3)  # 0 at the top, 1 at the domes
    f_left = (0.22 + 0.78 * np.sin(np.pi / 2 * np.clip(s, 0, 1))
              - 0.8 * np.maximum(s - 1.0, 0) ** 2)  # pulmonary trunk -> left ventricle
    f_right = (0.4 + 0.6 * np.sin(np.pi / 2 * np.clip(s * (1 / 0.65), 0, 1))
               - 0.5 * np.maximum(s - 0.75, 0) ** 2)  # SVC -> right atrium
    u_left = g.mediastinal_shift + left * f_left
    u_right = g.mediastinal_shift - right * f_right
    centre, half = g.mediastinal_shift + 0.5 * (left - right), 0.5 * (left + right)
    rounded_top = top + 0.25 * ((u - centre) * (1 / half)) ** 2
    inside = _ramp(u - u_right, edge) * _ramp(u_left - u, edge) * _ramp(v - rounded_top, 0.05)
    t = np.clip((u - u_right) / (u_left - u_right + 1e-6), 0, 1)
    return inside * (0.75 + 0.25 * np.sqrt(4 * t * (1 - t)))


def heart_width(spec: StudySpec, view: str = "PA") -> float:
    """Transverse cardiac diameter (canonical units) the renderer draws for a study."""
    _, _, right, left = _heart_extent(_frontal_geom(spec, view == "AP"))
    return right + left


def _diaphragm_v(x, dome):
    """Hemidiaphragm height at lateral coordinate x (lung base), steep laterally."""
    return dome + 1.1 * np.maximum(x - 0.3, 0.0) ** 2 + 0.25 * np.maximum(0.3 - x, 0.0) ** 2


def _apex_v(x):
    return -0.76 + 1.5 * (x - 0.33) ** 2


def _mediastinal_half_width(v, side_is_right, widening: float):
    """Half width of the mediastinum (from the midline) at height v, per side."""
    right = 0.07 + 0.032 * np.clip((v + 0.7) / 0.35, 0, 1) * np.clip((0.05 - v) / 0.1, 0, 1)
    left = (0.07 + 0.065 * np.exp(-(((v + 0.3) / 0.075) ** 2))  # aortic knob
            + 0.035 * np.exp(-(((v + 0.13) / 0.06) ** 2)))  # main pulmonary artery
    m = np.where(side_is_right, right, left)
    if widening != 1.0:
        bump = np.clip((v + 0.78) / 0.15, 0, 1) * np.clip((0.0 - v) / 0.2, 0, 1)
        m = m * (1.0 + (widening - 1.0) * bump)
    return m


def _lung_mask(u, v, g: _Geom, edge: float, shrink: dict[str, tuple] | None = None):
    """Soft mask of both lungs (the heart is applied later), the air-depth profile, and the
    distance to the chest wall.

    shrink: side -> (hilum_x, hilum_v, factor) evaluates a collapsed lung (pneumothorax):
    coordinates are pushed away from the hilum by 1 / factor before the chest-wall, apex and
    diaphragm tests; the lung stays attached to the mediastinum.
    """
    right = u < g.mediastinal_shift
    # medial border: distance from the (possibly shifted) mediastinum
    d_med = np.abs(u - g.mediastinal_shift) - _mediastinal_half_width(v, right, g.widening)
    x = np.abs(u)
    if shrink:
        for side, (hx, hv, fac) in shrink.items():
            sel = right if side == "right" else ~right
            x = np.where(sel, hx + (x - hx) / fac, x)
            v = np.where(sel, hv + (v - hv) / fac, v)
    dome = np.where(right, np.float32(g.dome["right"]), np.float32(g.dome["left"]))
    t = (v - _LUNG_CY) * (1 / _LUNG_BY)
    d_lat = (1.0 - np.sqrt((x * (1 / _LUNG_AX)) ** 2 + t * t)) * _LUNG_AX - 0.015
    d_apex = v - _apex_v(x)
    d_dia = _diaphragm_v(x, dome) - v
    mask = _ramp(d_lat, edge) * _ramp(d_med, edge) * _ramp(d_apex, edge) * _ramp(d_dia, edge)
    depth = ((0.4 + 0.6 * np.sqrt(np.clip(d_lat * (1 / 0.3), 0, 1)))
             * (0.65 + 0.35 * np.sqrt(np.clip(d_apex * (1 / 0.35), 0, 1)))
             * (0.8 + 0.2 * np.sqrt(np.clip(d_med * (1 / 0.15), 0, 1))))
    return mask, depth, d_lat, d_apex


def _inside_lung(x, v, dome: float, margin: float = 0.0):
    """Vectorised test: is (lateral x, v) inside a lung (ignoring the heart), with margin?"""
    x, v = np.asarray(x, dtype=float), np.asarray(v, dtype=float)
    return ((v > _apex_v(x) + margin) & (v < _diaphragm_v(x, dome) - margin)
            & (x > 0.08 + margin) & (x < _lung_half_width(v) - 0.015 - margin))
