"""The lateral view: anterior at the image left, both lungs superimposed (a finding in one
lung removes half the air), heart anterior-inferior, spine posterior; devices on top."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from echo_ray.synth.canvas import (
    _band,
    _ellipse_sd,
    _Frame,
    _gaussian_blur,
    _Layer,
    _ramp,
    _sides,
    _smooth_noise,
    _spline,
    _upsample,
    _work_size,
)
from echo_ray.synth.chest import _AIR, _DOME_L, _DOME_R
from echo_ray.synth.findings import (
    CONSOLIDATION_EXTENT,
    CTR_RANGES,
    EFFUSION_HEIGHT,
    FINDING_TYPES,
    MEDIASTINAL_WIDENING,
    MM_PER_UNIT,
    StudySpec,
)
from echo_ray.synth.streams import _rng, _u


def _lateral_geom(spec: StudySpec) -> tuple[float, float]:
    lift = (1.0 - spec.anatomy.inspiration) * 0.5
    return _DOME_R - lift, _DOME_L - lift


def _lateral_diaphragm(u, dome):
    """Hemidiaphragm on the lateral: highest anteriorly-central, deep posterior sulcus."""
    return dome + np.where(u > -0.2, 0.55 * (u + 0.2) ** 2, 0.35 * (u + 0.2) ** 2)


def _lateral_frame(spec: StudySpec, size: int) -> _Frame:
    return _Frame(size, spec.anatomy, aspect=1.0, rotation=spec.anatomy.rotation * 0.5)


def _lateral_fields(spec: StudySpec, frame: _Frame) -> dict[str, np.ndarray]:
    """The smooth part of a lateral view (see `_frontal_fields`)."""
    a = spec.anatomy
    size = frame.size
    u, v = frame.grid()
    edge = 0.8 / frame.ppu
    dome_r, dome_l = _lateral_geom(spec)

    # --- soft tissue: chest (front at -0.85, back at +1.0), neck, raised arms ----------
    front = -0.84 - 0.04 * a.soft_tissue + 0.3 * np.maximum(v - 0.4, 0.0) ** 2
    back = 0.96 + 0.03 * a.soft_tissue
    body = _ramp(u - front, edge * 3) * _ramp(back - u, edge * 3)
    mid, half = 0.5 * (front + back), 0.5 * (back - front)
    depth_profile = 0.55 + 0.45 * np.sqrt(np.clip(1 - ((u - mid) / half) ** 2, 0, 1))
    tissue = body * depth_profile * np.float32(1.0 + 0.15 * a.soft_tissue)
    # shoulders and raised arms over the top of a lateral
    tissue += 0.35 * _ramp(-0.55 - v, 0.35) * _ramp(1.0 - np.abs(u - 0.1), 0.2) * np.float32(
        a.arms_up)
    if a.breast > 0:
        tissue += np.float32(0.2 * a.breast) * _ramp(_ellipse_sd(u, v, -0.8, 0.42, 0.18, 0.22),
                                                     0.1)

    # --- lungs (both superimposed), each with its own hemidiaphragm --------------------
    t = (v - 0.3) * (1 / 1.15)
    d_wall = (1.0 - np.sqrt(((u - 0.03) * (1 / 0.7)) ** 2 + t * t)) * 0.7
    d_apex = v - (-0.8 + 0.8 * (u - 0.08) ** 2)
    cavity = _ramp(d_wall, edge) * _ramp(d_apex, edge) * _ramp(0.7 - u, edge * 2)
    cavity *= _ramp(u + 0.66, edge)
    lung_r = cavity * _ramp(_lateral_diaphragm(u, dome_r) - v, edge)
    lung_l = cavity * _ramp(_lateral_diaphragm(u, dome_l) - v, edge)
    lungs = 0.5 * (lung_r + lung_l)
    ctr = a.ctr
    if (f := spec.get("cardiomegaly")) is not None:
        ctr = f.params.get("ctr", sum(CTR_RANGES[f.grade]) / 2)
    k = ctr / 0.45
    hc = (-0.38 + 0.14 * (k - 1), dome_l - 0.12 - 0.05 * (k - 1))
    sd = _ellipse_sd(u, v, hc[0], hc[1], 0.4 * k, 0.32 * min(k, 1.2), -35)
    heart = _ramp(sd, edge * 2) * (0.6 + 0.4 * np.sqrt(np.clip(sd * (1 / 0.15), 0, 1)))
    air = lungs * (0.55 + 0.45 * np.sqrt(np.clip(d_wall * (1 / 0.25), 0, 1)))
    air *= 1.0 - 0.5 * heart  # lung lateral to the heart stays in the beam
    air *= 1.0 - 0.02 * _smooth_noise(_rng(spec.seed, "texture", spec.index, "LAT"), size, 64)

    # great vessels: ascending aorta, arch, descending aorta (faint)
    vessels = _Layer(frame, 0.3)
    widening = 1.0
    if (f := spec.get("enlarged_cardiomediastinum")) is not None:
        widening = f.params.get("widening", sum(MEDIASTINAL_WIDENING[f.grade]) / 2)
    vessels.line(_spline([(-0.22, -0.05), (-0.17, -0.3), (0.02, -0.45), (0.25, -0.35),
                          (0.36, -0.1), (0.38, 0.45)], 10), 0.075 * widening, 0.08)
    vessels.ellipse((0.05, -0.08), 0.1, 0.08, 0.12)  # hila
    air *= 1.0 - _gaussian_blur(vessels.array(), 3.0 * size / 512)

    air = _lateral_opacities(spec, frame, u, v, air, lungs, dome_r, dome_l, edge)
    return {"d": tissue * (1.0 - _AIR * air) + 0.08 * heart * tissue, "tissue": tissue,
            "lungs": lungs}


def _render_lateral(spec: StudySpec, size: int) -> tuple[np.ndarray, Any]:
    """Lateral view: anterior at the image left, spine posterior, heart anterior-inferior.
    Returns (attenuation, devices attenuation or 0.0)."""
    a = spec.anatomy
    frame = _lateral_frame(spec, size)
    small = _lateral_fields(spec, _lateral_frame(spec, _work_size(size)))
    f = {k: _upsample(x, size) for k, x in small.items()}
    d, tissue, lungs = f["d"], f["tissue"], f["lungs"]
    _, dome_l = _lateral_geom(spec)

    gas = _Layer(frame, 1.0)
    gas.line([(0.0, -1.15), (0.06, -0.6), (0.13, -0.2)], 0.04, 0.22)
    gas.ellipse((0.14, -0.16), 0.03, 0.025, 0.3)  # bronchi end-on
    gas.ellipse((-0.1, dome_l + 0.12), 0.1, 0.05, 0.8)
    d -= 0.25 * tissue * gas.array()

    # pulmonary vessels: short branching densities around the hilum
    ves = _Layer(frame)
    rng = _rng(spec.seed, "vessels-lat", spec.index)
    for _ in range(70):
        ang = _u(rng, 0, 2 * math.pi)
        p0 = np.array([0.05, -0.06]) + _u(rng, 0.05, 0.35) * np.array([math.cos(ang),
                                                                      math.sin(ang)])
        pts = [p0]
        for _j in range(2):
            ang += _u(rng, -0.8, 0.8)
            pts.append(pts[-1] + _u(rng, 0.03, 0.07) * np.array([math.cos(ang), math.sin(ang)]))
        ves.line(pts, _u(rng, 0.004, 0.012), 0.035)
    d += ves.array() * lungs * tissue

    # bones: vertebral bodies with endplates (the lower spine looks darker), sternum, ribs
    bones = _Layer(frame)
    for j in range(17):
        vc = -0.95 + 0.118 * j
        fade = 1.0 - 0.35 * float(np.clip((vc + 0.3) / 1.0, 0, 1))
        c = (0.52 + 0.02 * math.sin(vc * 1.5), vc)
        body_pts = [(c[0] - 0.08, c[1] - 0.04), (c[0] + 0.075, c[1] - 0.043),
                    (c[0] + 0.08, c[1] + 0.043), (c[0] - 0.075, c[1] + 0.04)]
        bones.polygon(body_pts, 0.07 * fade)
        bones.line([body_pts[0], body_pts[1]], 0.007, 0.12 * fade)
        bones.line([body_pts[3], body_pts[2]], 0.007, 0.12 * fade)
        bones.line([(c[0] + 0.1, c[1] - 0.02), (c[0] + 0.25, c[1] + 0.03)], 0.03, 0.06 * fade)
    sternum = _spline([(-0.68, -0.68), (-0.71, -0.3), (-0.73, 0.1), (-0.73, 0.25)], 6)
    bones.polygon(_band(sternum, np.linspace(0.07, 0.035, len(sternum))), 0.04)
    bones.line(sternum + [0.018, 0], 0.006, 0.08)
    ribs = _Layer(frame)
    for j in range(10):
        v0 = -0.62 + 0.12 * j
        rib = _spline([(0.72, v0), (0.5, v0 + 0.08), (0.25, v0 + 0.2), (0.0, v0 + 0.34)], 5)
        ribs.polygon(_band(rib, 0.035), 0.035)
    humerus = _Layer(frame)
    for du in (-0.05, 0.12):
        humerus.line([(du - 0.1, -1.15), (du + 0.05, -0.55)], 0.1, 0.09)
    d += bones.array() + ribs.array() + humerus.array() * a.arms_up
    return d, _draw_devices_lateral(spec, frame, dome_l)


_LATERAL_LOBES = {
    "rul": (-0.08, -0.4, 0.3, 0.22), "lul": (-0.12, -0.38, 0.32, 0.24),
    "rml": (-0.4, 0.14, 0.2, 0.12), "lingula": (-0.38, 0.08, 0.2, 0.13),
    "rll": (0.38, 0.3, 0.24, 0.22), "lll": (0.4, 0.32, 0.24, 0.22),
}


def _lateral_opacities(spec, frame, u, v, air, lungs, dome_r, dome_l, edge):
    """Findings on the lateral: one lung's opacity removes half the superimposed air."""
    size = frame.size
    for f in spec.findings:
        frng = _rng(spec.seed, "finding", spec.index, f.type, "LAT")
        if f.type == "pleural_effusion":
            for s in _sides(f.side):
                h = f.params.get(f"height_{s}", sum(EFFUSION_HEIGHT[f.grade]) / 2)
                dome = dome_r if s == "right" else dome_l
                v_cp = float(_lateral_diaphragm(0.68, dome))
                un = np.clip((u + 0.4) * (1 / 1.05), 0, 1)
                meniscus = v_cp - h * (0.25 + 0.75 * un**1.3)  # higher posteriorly
                fluid = np.clip((v - meniscus) * (1 / (0.04 + 0.1 * h)), 0.0, 1.0) ** 0.7
                air = air * (1.0 - 0.48 * fluid)
        elif f.type in ("consolidation", "pneumonia"):
            cx, cv, rx, rv = _LATERAL_LOBES[f.location]
            k = f.params.get("extent", sum(CONSOLIDATION_EXTENT[f.grade]) / 2)
            region = _ramp(_ellipse_sd(u, v, cx, cv, rx * k, rv * k), 0.12 * k)
            patch = _smooth_noise(frng, size, 14)
            air = air * (1.0 - 0.45 * region * np.clip(0.55 + 0.35 * patch + 0.45 * region, 0,
                                                        1))
        elif f.type == "atelectasis":
            dome = dome_r if f.side == "right" else dome_l
            thick = {"mild": 0.018, "moderate": 0.03, "severe": 0.06}[f.grade]
            band = _ramp(_ellipse_sd(u, v, 0.25, float(_lateral_diaphragm(0.25, dome)) - 0.1,
                                     0.18, thick, 12), edge)
            air = air * (1.0 - (0.9 if f.side == "bilateral" else 0.45) * band)
        elif f.type == "edema":
            level = {"mild": 0.16, "moderate": 0.34, "severe": 0.56}[f.grade]
            haze = np.exp(-(((u - 0.05) * (1 / 0.38)) ** 2 + ((v + 0.0) * (1 / 0.42)) ** 2))
            air = air * (1.0 - level * haze)
        elif f.type in ("nodule", "mass"):
            r = f.size_mm / 2 / MM_PER_UNIT
            cu, cv = f.params.get("depth", 0.0), f.params.get("v", -0.2)
            rr2 = ((u - cu) ** 2 + (v - cv) ** 2) * (1 / r**2)
            prof = np.clip(1.0 - rr2, 0.0, 1.0) ** 0.3
            air = air * (1.0 - 0.5 * min(0.9, 0.3 + f.size_mm / 60.0) * prof)
    return air


def _draw_devices_lateral(spec: StudySpec, frame: _Frame, dome_l: float) -> np.ndarray:
    if not any(FINDING_TYPES[f.type].device for f in spec.findings):
        return np.float32(0.0)
    tubes, metal = _Layer(frame, 0.6), _Layer(frame, 1.5)
    cm = 10.0 / MM_PER_UNIT
    for f in spec.findings:
        if f.type == "endotracheal_tube":
            tip = (0.11, -0.22 - f.params.get("tip_cm", 4) * cm)
            path = np.array([(-0.08, -1.15), (0.04, -0.7), tip])
            tubes.line(path, 0.03, 0.12)
            tubes.line(path + [0.01, 0], 0.006, 0.55)
        elif f.type == "enteric_tube":
            end = (-0.12, dome_l + 0.15) if f.grade == "stomach" else (0.3, 0.28)
            ctrl = [(0.05, -1.15), (0.2, -0.5), (0.3, 0.1), end]
            tubes.line(_spline(ctrl, 8), 0.016, 0.4)
        elif f.type in ("central_line", "picc"):
            tip = {"mid_svc": (-0.14, -0.2), "cavoatrial": (-0.14, -0.04),
                   "atrium": (-0.16, 0.07)}[f.grade]
            metal.line(_spline([(0.05, -1.15), (-0.05, -0.6), (-0.12, -0.35), tip], 8), 0.01,
                       0.5)
        elif f.type == "pacemaker":
            gen = np.array((-0.7, -0.5))
            metal.polygon(np.array([(-0.03, -0.07), (0.03, -0.07), (0.03, 0.07), (-0.03, 0.07)])
                          + gen, 1.3)
            for j in range(f.params.get("leads", 2)):
                tip = [(-0.45, 0.3), (-0.22, 0.05)][j]
                metal.line(_spline([gen, (-0.45, -0.62), (-0.2, -0.35), tip], 8), 0.009, 0.65)
        elif f.type == "sternotomy":
            for j in range(f.params.get("wires", 6)):
                vc = -0.5 + j * 0.12
                metal.line([(-0.74, vc - 0.015), (-0.69, vc + 0.015)], 0.012, 1.1)
    return tubes.array() + metal.array()
