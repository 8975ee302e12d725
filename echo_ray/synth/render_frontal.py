"""The frontal (PA / AP) view: body, lungs, heart and the findings' opacities as smooth fields
at the work size, then gas, vessels, bones, finding lines and devices drawn at full size."""

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
    _mirror,
    _normals,
    _ramp,
    _side_sign,
    _sides,
    _smooth_noise,
    _spline,
    _upsample,
    _work_size,
)
from echo_ray.synth.chest import (
    _AIR,
    _DOME_L,
    _DOME_R,
    _HILUM,
    _diaphragm_v,
    _frontal_geom,
    _Geom,
    _heart_mask,
    _inside_lung,
    _lung_half_width,
    _lung_mask,
)
from echo_ray.synth.findings import (
    CONSOLIDATION_EXTENT,
    EFFUSION_HEIGHT,
    FINDING_TYPES,
    MM_PER_UNIT,
    PNEUMOTHORAX_COLLAPSE,
    StudySpec,
)
from echo_ray.synth.streams import _rng, _u


def _frontal_fields(spec: StudySpec, g: _Geom, frame: _Frame, view: str) -> dict[str, Any]:
    """The smooth part of a frontal view: density without lines/bones/devices, plus the
    tissue, lung, heart and vessel-visibility maps the full-size layers are weighted by."""
    a = spec.anatomy
    u, v = frame.grid()
    edge = 0.8 / frame.ppu  # ~1.6 px soft edges at the output size
    au = np.abs(u)

    # --- body: torso, shoulders sloping to the neck, breasts ---------------------------
    body_ax = 0.9 + 0.08 * a.soft_tissue
    torso = _ramp(_ellipse_sd(u, v, 0.0, 0.45, body_ax, 1.42), edge * 3)
    shoulder_top = -1.08 + 0.45 * np.clip((au - 0.18) * (1 / 0.8), 0, 1) ** 1.4
    upper = _ramp(v - shoulder_top, edge * 3) * _ramp(1.04 - au, edge * 4)
    upper *= _ramp(-0.25 - v, 0.35)
    body = np.maximum(torso, upper)
    profile = 0.25 + 0.75 * np.sqrt(np.clip(1.0 - (u * (1 / body_ax)) ** 2, 0.0, 1.0))
    tissue = body * profile * np.float32(0.85 + 0.15 * a.soft_tissue)
    if a.breast > 0:
        for s in (-1, 1):
            sd = _ellipse_sd(u, v, s * 0.46, 0.5, 0.3 + 0.06 * a.breast, 0.2 + 0.05 * a.breast)
            tissue += np.float32(0.2 * a.breast) * np.sqrt(np.clip(sd * (1 / 0.1), 0, 1)) * body

    # --- lungs, and the collapsed lung of a pneumothorax -------------------------------
    lung, depth, d_lat, d_apex = _lung_mask(u, v, g, edge)
    air = lung * depth
    shrink = _pneumothorax_shrink(spec, v)
    ptx_space = collapsed = None
    if shrink:
        collapsed = _lung_mask(u, v, g, edge, shrink)[0]
        ptx_space = np.clip(lung - collapsed, 0.0, 1.0)
        # pleural air: no lung tissue, more lucent than lung
        air = air * (1.0 - ptx_space) + ptx_space * np.minimum(1.0, depth * 1.15)
    texture = _smooth_noise(_rng(spec.seed, "texture", spec.index, view), frame.size, 40)
    air = air * (1.0 - 0.06 * texture)

    # --- heart: in front of the lungs ----------------------------------------------------
    heart = _heart_mask(u, v, g, edge)
    air *= 1.0 - 0.88 * heart

    # --- findings that replace air with fluid or tissue (and hide the vessels in it) -----
    clear = air
    air = _frontal_opacities(spec, g, frame, u, v, air, lung, d_lat, d_apex, edge)
    vis = lung * (1.0 - 0.75 * heart) * np.clip(air / (clear + 0.02), 0.0, 1.0)
    pleural_line = None
    if ptx_space is not None:
        vis = vis * (1.0 - ptx_space)
        # the visceral pleural line: the collapsed lung's edge where pleural air borders it
        near = np.clip(_gaussian_blur(ptx_space, 2.0) * 4.0, 0.0, 1.0)
        pleural_line = np.clip(4.0 * collapsed * (1.0 - collapsed), 0, 1) * lung * near
    return {"d": tissue * (1.0 - _AIR * air) + 0.08 * heart * tissue, "tissue": tissue,
            "lung": lung, "heart": heart, "vis": vis, "pleural_line": pleural_line}


def _render_frontal(spec: StudySpec, view: str, size: int) -> tuple[np.ndarray, Any]:
    """(anatomy + findings attenuation, devices attenuation or 0.0) of a PA / AP view."""
    a = spec.anatomy
    ap = view == "AP"
    g = _frontal_geom(spec, ap)
    frame = _Frame(size, a)
    small = _frontal_fields(spec, g, _Frame(_work_size(size), a), view)
    lines_needed = any(x.type in ("pneumothorax", "edema") for x in spec.findings)
    f = {k: _upsample(x, size) for k, x in small.items()
         if x is not None and (k != "lung" or lines_needed)}
    d, tissue = f["d"], f["tissue"]

    # --- gas: trachea, main bronchi, stomach ---------------------------------------------
    gas = _Layer(frame, 1.0)
    sh = g.mediastinal_shift
    carina = (sh * 0.8, -0.2)
    gas.line([(sh * 0.3, -1.1), (sh * 0.6, -0.6), carina], 0.048, 1.0)
    gas.line([carina, (carina[0] - 0.06, -0.13), (-0.14 + sh, -0.07)], 0.03, 0.8)
    gas.line([carina, (carina[0] + 0.07, -0.16), (0.15 + sh, -0.11)], 0.028, 0.8)
    gas.ellipse((0.3, g.dome["left"] + 0.1), 0.08, 0.045, 1.0)
    d -= 0.25 * tissue * gas.array()

    # --- vessels, bones (dimmed by the heart's density), finding lines, devices ---------
    d += _draw_vessels(spec, g, frame) * f["vis"] * tissue
    d += _draw_bones(spec, g, frame, ap) * (1.0 - 0.45 * f["heart"])
    d += _frontal_extras(spec, g, frame, f.get("lung"), tissue, f.get("pleural_line"))
    return d, _draw_devices_frontal(spec, g, frame)


def _pneumothorax_shrink(spec: StudySpec, v: np.ndarray) -> dict[str, tuple] | None:
    f = spec.get("pneumothorax")
    if f is None:
        return None
    r = f.params.get("collapse", sum(PNEUMOTHORAX_COLLAPSE[f.grade]) / 2)
    hx, hv = _HILUM[f.side]
    if f.grade == "small":  # apical: the collapse is concentrated at the apex
        w = np.clip((0.05 - v) * (1 / 0.75), 0.0, 1.0)
    elif f.grade == "moderate":
        w = np.clip((0.55 - v) * (1 / 1.0), 0.3, 1.0)
    else:
        w = np.ones_like(v)
    return {f.side: (hx, hv, 1.0 - r * w)}


# Lobe regions on the frontal view: (lateral x, v, rx, rv).
_LOBE_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "rul": (0.36, -0.36, 0.24, 0.22),
    "rml": (0.24, 0.12, 0.2, 0.14),
    "rll": (0.45, 0.3, 0.26, 0.16),
    "lul": (0.38, -0.36, 0.25, 0.24),
    "lingula": (0.36, 0.1, 0.2, 0.15),
    "lll": (0.4, 0.33, 0.26, 0.16),
}


def _frontal_opacities(spec, g, frame, u, v, air, lung, d_lat, d_apex, edge):
    """Fluid or tissue replacing lung air: effusion, consolidation, atelectasis, edema,
    nodules and masses, pleural thickening."""
    size = frame.size
    right = u < g.mediastinal_shift
    x = np.abs(u)
    sh = g.mediastinal_shift
    for f in spec.findings:
        frng = _rng(spec.seed, "finding", spec.index, f.type)
        if f.type == "pleural_effusion":
            for s in _sides(f.side):
                h = f.params.get(f"height_{s}", sum(EFFUSION_HEIGHT[f.grade]) / 2)
                sel = right if s == "right" else ~right
                v_cp = float(_diaphragm_v(0.74, g.dome[s]))
                xn = np.clip((x - 0.1) * (1 / 0.64), 0.0, 1.0)
                meniscus = v_cp - h * (0.45 + 0.55 * xn**1.5)  # higher laterally
                fluid = np.clip((v - meniscus) * (1 / (0.04 + 0.1 * h)), 0.0, 1.0) ** 0.7
                if g.ap:  # supine layering: a veil over the whole hemithorax
                    fluid = np.maximum(fluid, 0.5 * h * np.clip((v + 0.7) * (1 / 1.2), 0, 1))
                air = np.where(sel, air * (1.0 - 0.95 * fluid), air)
        elif f.type in ("consolidation", "pneumonia"):
            cx, cv, rx, rv = _LOBE_REGIONS[f.location]
            k = f.params.get("extent", sum(CONSOLIDATION_EXTENT[f.grade]) / 2)
            cx += f.params.get("du", 0.0)
            cv += f.params.get("dv", 0.0)
            sgn = _side_sign(f.side)
            region = _ramp(_ellipse_sd(u, v, sgn * cx + sh, cv, rx * k, rv * k), 0.12 * k)
            if f.location == "rul":  # minor fissure: a sharp inferior border
                region *= _ramp(-0.08 - v, edge)
            patch = _smooth_noise(frng, size, 14)
            opacity = region * np.clip(0.5 + 0.35 * patch + 0.45 * region, 0.0, 1.0)
            air = air * (1.0 - 0.85 * opacity)
            # air bronchograms: dark branching tubes inside the opacity
            br = _Layer(frame, 1.0)
            for _ in range(3):
                p0 = np.array([cx - rx * k * 0.7, cv + _u(frng, -0.5, 0.5) * rv * k])
                ang = _u(frng, -0.5, 0.5)
                pts = [p0]
                for _j in range(4):
                    ang += _u(frng, -0.3, 0.3)
                    pts.append(pts[-1] + 0.06 * k * np.array([math.cos(ang), math.sin(ang)]))
                br.line(_mirror(pts, f.side, sh), 0.012, 1.0)
            air = air + 0.3 * opacity * lung * _gaussian_blur(br.array(), 0.8 * size / 512)
        elif f.type == "atelectasis":
            for s in _sides(f.side):
                sgn = _side_sign(s)
                sel = right if s == "right" else ~right
                if f.grade == "severe":  # lower lobe collapse: a triangle behind the heart
                    dome = g.dome[s]
                    tri = _ramp(np.minimum(v - (dome - 0.4 + 1.0 * (x - 0.07)), dome + 0.1 - v),
                                0.02) * _ramp(0.34 - x, 0.02)
                    air = np.where(sel, air * (1.0 - 0.85 * tri), air)
                    continue
                thick = 0.014 if f.grade == "mild" else 0.028
                cx = f.params.get("x", 0.4)
                cv = g.dome[s] + f.params.get("v", -0.1)
                length = f.params.get("length", 0.22)
                band = _ramp(_ellipse_sd(u, v, sgn * cx + sh, cv, length / 2, thick,
                                         sgn * f.params.get("angle", 0.0)), edge)
                air = air * (1.0 - 0.85 * band)
        elif f.type == "edema":
            level = {"mild": 0.2, "moderate": 0.4, "severe": 0.62}[f.grade]
            haze = np.zeros_like(u)
            for s in ("left", "right"):
                hx, hv = _HILUM[s]
                du = (u - _side_sign(s) * (hx + 0.1) - sh) * (1 / 0.32)
                haze = np.maximum(haze, np.exp(-(du * du + ((v - hv - 0.1) * (1 / 0.42)) ** 2)))
            if f.grade != "mild":
                patch = _smooth_noise(frng, size, 16)
                haze = np.clip(haze * (1.0 + 0.35 * patch), 0, 1)
            air = air * (1.0 - level * haze)
        elif f.type in ("nodule", "mass"):
            cx, cv = f.params.get("x", 0.45), f.params.get("v", -0.2)
            r = f.size_mm / 2 / MM_PER_UNIT
            cu = _side_sign(f.side) * cx + sh
            prof = np.zeros_like(u)
            blobs = [(0.0, 0.0, 1.0)]
            if f.type == "mass" and f.params.get("lobulation", 0.0) > 0.4:
                blobs += [(0.5, -0.3, 0.7), (-0.4, 0.4, 0.65)]
            for du, dv, rs in blobs:
                rr2 = ((u - (cu + du * r)) ** 2 + (v - (cv + dv * r)) ** 2) * (1 / (r * rs) ** 2)
                prof = np.maximum(prof, np.clip(1.0 - rr2, 0.0, 1.0) ** 0.3)
            strength = min(0.9, 0.3 + f.size_mm / 60.0)
            air = air * (1.0 - strength * prof)
        elif f.type == "pleural_other" and f.grade == "thickening":
            for s in _sides(f.side):
                sel = right if s == "right" else ~right
                th = f.params.get("thickness", 0.035)
                if f.location == "apical":  # an apical cap
                    ring = _ramp(th * 1.3 - d_apex, edge * 2) * lung * _ramp(-0.45 - v, 0.1)
                else:
                    ring = _ramp(th - d_lat, edge * 2) * lung
                    ring *= _ramp(v + 0.4, 0.1) * _ramp(0.35 - v, 0.1)
                air = np.where(sel, air * (1.0 - 0.85 * ring), air)
    return air


def _frontal_extras(spec, g, frame, lung, tissue, pleural_line):
    """Additive densities: the visceral pleural line, Kerley B lines, calcified plaques."""
    out = np.zeros_like(tissue)
    sh = g.mediastinal_shift
    for f in spec.findings:
        frng = _rng(spec.seed, "finding-lines", spec.index, f.type)
        if f.type == "pneumothorax" and pleural_line is not None:
            out += 0.12 * pleural_line * tissue
        elif f.type == "edema" and f.grade != "mild":
            kl = _Layer(frame, 1.0)
            for s in ("left", "right"):
                for _ in range(int(frng.integers(6, 11))):
                    vv = _u(frng, g.dome[s] - 0.3, g.dome[s] + 0.02)
                    xl = float(_lung_half_width(vv)) - 0.02
                    ln = _u(frng, 0.025, 0.05)
                    kl.line(_mirror([(xl - ln, vv), (xl, vv + _u(frng, -0.004, 0.004))], s, sh),
                            0.005, 1.0)
            out += 0.14 * kl.array() * lung * tissue
        elif f.type == "pleural_other" and f.grade == "plaques":
            pl = _Layer(frame, 1.0)
            for s in _sides(f.side):
                for _ in range(f.params.get("count", 4)):
                    if frng.random() < 0.3:  # diaphragmatic plaque
                        xl = _u(frng, 0.3, 0.55)
                        vv = float(_diaphragm_v(xl, g.dome[s])) - 0.005
                        pl.line(_mirror([(xl - 0.05, vv + 0.005), (xl + 0.05, vv)], s, sh),
                                0.012, 1.0)
                    else:  # en face / profile plaque on the lateral chest wall
                        vv = _u(frng, -0.3, g.dome[s] + 0.02)
                        xl = min(float(_lung_half_width(vv)) - 0.03, 0.75)
                        ln = _u(frng, 0.05, 0.1)
                        pts = [(xl, vv - ln / 2), (xl - 0.012, vv), (xl, vv + ln / 2)]
                        pl.line(_mirror(pts, s, sh), _u(frng, 0.012, 0.02), 1.0)
            out += 0.4 * _gaussian_blur(pl.array(), 0.6 * frame.size / 512)
    return out


_VESSEL_ROOTS = (  # (dx, dv from the hilum, angle degrees (0 lateral, +90 down), width)
    (0.0, -0.06, -105.0, 0.028), (0.015, -0.05, -68.0, 0.03), (0.03, -0.01, -28.0, 0.026),
    (0.03, 0.02, 12.0, 0.028), (0.01, 0.06, 55.0, 0.04), (-0.01, 0.08, 88.0, 0.042),
)


def _draw_vessels(spec: StudySpec, g: _Geom, frame: _Frame) -> np.ndarray:
    """Pulmonary vessels: branching trees from each hilum, tapering to the periphery
    (vectorised per generation; Pillow draws the segments)."""
    rng = _rng(spec.seed, "vessels", spec.index)
    layer = _Layer(frame)
    edema = spec.get("edema")
    engorge = {"mild": 1.2, "moderate": 1.3, "severe": 1.35}[edema.grade] if edema else 1.0
    for side in ("right", "left"):
        hx, hv = _HILUM[side]
        roots = np.array(_VESSEL_ROOTS)
        x0 = hx + roots[:, 0]
        v0 = hv + roots[:, 1]
        ang = np.radians(roots[:, 2]) + rng.uniform(-0.15, 0.15, len(roots))
        ln = rng.uniform(0.1, 0.14, len(roots))
        w = roots[:, 3].copy()
        segs, widths = [], []
        for _gen in range(8):
            n = len(x0)
            if n == 0:
                break
            bend = rng.uniform(-0.3, 0.3, n)
            xm, vm = x0 + 0.5 * ln * np.cos(ang), v0 + 0.5 * ln * np.sin(ang)
            a1 = ang + bend
            x1, v1 = xm + 0.5 * ln * np.cos(a1), vm + 0.5 * ln * np.sin(a1)
            ok = _inside_lung(x1, v1, g.dome[side], margin=0.015)
            segs.append(np.stack([x0, v0, xm, vm, x1, v1], 1)[ok])
            ww = w * engorge * np.where(edema is not None and v1 < -0.2, 1.25, 1.0)
            widths.append(ww[ok])
            go = ok & (w > 0.005)
            x1, v1, a1, ln, w = x1[go], v1[go], a1[go], ln[go], w[go]
            m = len(x1)
            spread = rng.uniform(0.22, 0.5, (2, m))
            x0 = np.concatenate([x1, x1])
            v0 = np.concatenate([v1, v1])
            ang = np.concatenate([a1 - spread[0], a1 + spread[1]])
            ln = np.concatenate([ln, ln]) * rng.uniform(0.72, 0.9, 2 * m)
            w = np.concatenate([w, w]) * rng.uniform(0.62, 0.78, 2 * m)
        pts = np.concatenate(segs).reshape(-1, 3, 2)
        wid = np.concatenate(widths)
        if side == "right":
            pts[..., 0] *= -1
        pts[..., 0] += g.mediastinal_shift
        xy = frame.px(pts).reshape(len(pts), 6)
        for row, wu in zip(xy.tolist(), wid.tolist(), strict=True):
            layer.lines_px(row, frame.width_px(wu), 0.04 + 3.2 * wu)
    arr = layer.array()
    return _gaussian_blur(arr, 2.2 * frame.size / 512) if edema else arr


def _rib_paths(g: _Geom, side: str, ap: bool):
    """Posterior and anterior rib centre-lines (lateral x, v) for ribs 1..10 of one side:
    one spline per rib from the spine, over the lateral turn, to the costal cartilage."""
    post, ant = {}, {}
    lift = (_DOME_R if side == "right" else _DOME_L) - g.dome[side]
    spacing = 0.116 - 0.5 * lift / 9
    for k in range(1, 11):
        v0 = -0.8 + spacing * (k - 0.35)
        x_lat = max(0.2, float(_lung_half_width(v0 + 0.14)) + 0.025)
        drop = (0.26 if not ap else 0.2) + 0.012 * k  # anterior ribs run down to the sternum
        if k == 1:
            ctrl = [(0.05, v0), (0.15, v0 - 0.07), (0.28, v0 - 0.06), (x_lat, v0 + 0.05),
                    (0.12, v0 + 0.14)]
            turn = 3
        else:
            ctrl = [(0.05, v0), (0.22, v0 - 0.035), (x_lat - 0.1, v0 + 0.04),
                    (x_lat, v0 + 0.15), (x_lat - 0.1, v0 + 0.15 + drop * 0.4),
                    (0.3, v0 + 0.15 + drop)]
            turn = 3
        path = _spline(ctrl, 8)
        i = turn * 8
        post[k] = path[: i + 3]
        if k <= 8:
            ant[k] = path[i - 2:]
    return post, ant


def _draw_bones(spec: StudySpec, g: _Geom, frame: _Frame, ap: bool) -> np.ndarray:
    a = spec.anatomy
    post = _Layer(frame)  # posterior ribs + spine
    ant = _Layer(frame)  # anterior ribs + humeral heads
    girdle = _Layer(frame)  # clavicles + scapulae
    frac = spec.get("fracture")
    sh = g.mediastinal_shift
    so = sh * 0.3  # the spine moves less than the mediastinum
    # thoracic spine: a column of vertebral bodies with endplates, pedicles, spinous processes
    post.polygon([(-0.05 + so, -1.1), (0.05 + so, -1.1), (0.062 + so, 0.9), (-0.062 + so, 0.9)],
                 0.035)
    for k in range(-2, 16):
        vc = -0.86 + 0.118 * k
        hw = 0.05 + 0.0012 * k
        for dv in (-0.047, 0.047):
            post.line([(-hw + so, vc + dv), (hw + so, vc + dv)], 0.006, 0.06)
        for s in (-1, 1):
            post.ellipse((s * hw * 0.72 + so, vc - 0.012), 0.012, 0.019, 0.05, outline=0.08,
                         width=0.005)
        post.ellipse((a.spine_offset + so, vc + 0.025), 0.008, 0.02, 0.07)
    for side in ("right", "left"):
        posts, ants = _rib_paths(g, side, ap)
        for k, path in posts.items():
            width = np.interp(np.linspace(0, 1, len(path)), [0, 0.8, 1],
                              [0.03, 0.048 + 0.002 * k, 0.04])
            pieces, widths = [path], [width]
            if frac is not None and frac.side == side and frac.params.get("rib", 6) == k:
                i = int(round(frac.params.get("t", 0.8) * (len(path) - 1)))
                step = 0.9 * width[i] if frac.grade == "displaced" else 0.0
                pieces = [path[: i + 1], path[i:] + np.array([0.0, step])]
                widths = [width[: i + 1], width[i:]]
            for piece, wd in zip(pieces, widths, strict=True):
                if len(piece) < 2:
                    continue
                post.polygon(_mirror(_band(piece, wd), side, sh * 0.2), 0.045)
                nrm = _normals(piece)
                for e in (-1, 1):  # cortical margins
                    post.line(_mirror(piece + e * nrm * (wd[:, None] * 0.46), side, sh * 0.2),
                              0.006, 0.085)
            if len(pieces) == 2:
                cut = pieces[1][0]
                d = pieces[1][1] - cut
                n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
                w0 = widths[1][0]
                if frac.grade == "healing":  # callus: a dense fusiform bulge
                    c = _mirror(cut, side, sh * 0.2)[0]
                    ang = math.degrees(math.atan2(d[1], d[0] * _side_sign(side)))
                    post.ellipse(tuple(c), 0.03, w0 * 0.85, 0.15, angle=ang)
                else:  # a lucent fracture line across the rib
                    gap = np.array([cut + n * w0 * 0.8, cut - n * w0 * 0.8 + d * 0.4])
                    post.line(_mirror(gap, side, sh * 0.2), 0.011, 0.0)
        for path in ants.values():
            path = path[path[:, 1] < g.dome[side] + 0.02]  # costal cartilage is not seen
            if len(path) < 3:
                continue
            wd = np.linspace(0.04, 0.03, len(path))
            ant.polygon(_mirror(_band(path, wd), side), 0.04)
            nrm = _normals(path)
            for e in (-1, 1):
                ant.line(_mirror(path + e * nrm * (wd[:, None] * 0.46), side), 0.005, 0.07)
        # clavicle: S-shaped, from the manubrium out to the acromion
        cv0 = -0.63 if not ap else -0.7
        rise = 0.16 if not ap else 0.05
        cl = _spline([(0.04, cv0 + 0.035), (0.16, cv0 + 0.01), (0.32, cv0 - 0.02 - rise * 0.4),
                      (0.5, cv0 - 0.03 - rise * 0.8), (0.66, cv0 - 0.04 - rise)], 6)
        wd = np.interp(np.linspace(0, 1, len(cl)), [0, 0.15, 1], [0.06, 0.045, 0.04])
        girdle.polygon(_mirror(_band(cl, wd), side), 0.08)
        nrm = _normals(cl)
        for e in (-1, 1):
            girdle.line(_mirror(cl + e * nrm * (wd[:, None] * 0.46), side), 0.006, 0.12)
        # scapula: rotated out of the lungs on PA, over the lateral lung on AP
        sx = 0.72 if not ap else 0.5
        scap = [(sx + 0.05, -0.68), (sx + 0.3, -0.7), (sx + 0.3, -0.3), (sx + 0.14, -0.02),
                (sx, -0.35)]
        girdle.polygon(_mirror(scap, side), 0.045)
        girdle.line(_mirror(_spline([(sx + 0.04, -0.66), (sx - 0.005, -0.35), (sx + 0.14, -0.02)],
                                    6), side), 0.008, 0.09)
        # humerus: head by the glenoid, shaft running down and out of the field
        shaft = _mirror([(0.98, -0.6), (1.08, -0.2), (1.14, 0.3)], side)
        ant.line(shaft, 0.14, 0.1)
        hc = _mirror([(0.97, -0.63)], side)[0]
        ant.ellipse(tuple(hc), 0.12, 0.11, 0.1, outline=0.16, width=0.007)
    return post.array() + ant.array() + girdle.array()


def _draw_devices_frontal(spec: StudySpec, g: _Geom, frame: _Frame) -> np.ndarray:
    if not any(FINDING_TYPES[f.type].device for f in spec.findings):
        return np.float32(0.0)
    tubes = _Layer(frame, 0.6)  # radio-opaque plastic
    metal = _Layer(frame, 1.5)  # wires, catheters, generators
    sh = g.mediastinal_shift
    carina_v = -0.2
    cm = 10.0 / MM_PER_UNIT  # one cm in canonical units
    svc = {"mid_svc": (-0.07 + sh, -0.22), "cavoatrial": (-0.065 + sh, -0.04),
           "atrium": (-0.06 + sh, 0.07)}
    for f in spec.findings:
        rng = _rng(spec.seed, "device", spec.index, f.type)
        if f.type == "endotracheal_tube":
            tip_v = carina_v - f.params.get("tip_cm", 4) * cm
            path = np.array([(sh * 0.3, -1.15), (sh * 0.5, -0.7), (sh * 0.75, tip_v)])
            tubes.line(path, 0.03, 0.12)
            tubes.line(path + [0.011, 0], 0.006, 0.55)  # the radio-opaque stripe
        elif f.type == "enteric_tube":
            ctrl = [(0.02 + sh * 0.3, -1.15), (0.035 + sh * 0.5, -0.5), (0.05 + sh * 0.6, 0.1)]
            if f.grade == "stomach":
                ctrl += [(0.1, g.dome["left"] + 0.04), (0.22, g.dome["left"] + 0.13),
                         (0.36, g.dome["left"] + 0.17)]
            else:
                ctrl += [(0.055 + sh * 0.6, 0.25)]
            tubes.line(_spline(ctrl, 8), 0.016, 0.4)
        elif f.type in ("central_line", "picc"):
            tip = svc[f.grade]
            s = _side_sign(f.side)
            if f.type == "central_line" and f.params.get("access") == "internal_jugular":
                ctrl = [(s * 0.15, -1.15), (s * 0.12, -0.75), (s * 0.09 + sh, -0.52)]
            elif f.type == "central_line":
                ctrl = [(s * 0.42, -0.63), (s * 0.25, -0.6), (s * 0.1 + sh, -0.5)]
            else:
                ctrl = [(s * 1.1, -0.42), (s * 0.8, -0.58), (s * 0.45, -0.64), (s * 0.2, -0.58),
                        (s * 0.08 + sh, -0.45)]
            if f.side == "left":  # crosses the midline through the brachiocephalic vein
                ctrl += [(0.0 + sh, -0.42)]
            metal.line(_spline(ctrl + [tip], 10), 0.011 if f.type == "central_line" else 0.008,
                       0.55)
        elif f.type == "pacemaker":
            s = _side_sign(f.side)
            gen = np.array((s * 0.55, -0.52))
            box = np.array([(-0.08, -0.055), (0.08, -0.055), (0.09, 0.0), (0.08, 0.055),
                            (-0.08, 0.055), (-0.09, 0.0)]) + gen
            metal.polygon(box, 1.4)
            metal.polygon(np.array([(-0.05, -0.03), (0.03, -0.03), (0.03, 0.03), (-0.05, 0.03)])
                          + gen, 1.1)
            tips = [(0.2 + sh, 0.33), (-0.04 + sh, 0.02)][: f.params.get("leads", 2)]
            for j, tip in enumerate(tips):
                ctrl = [gen, (s * 0.35, -0.62), (s * 0.12, -0.55), (-0.07 + sh, -0.3),
                        (-0.06 + sh, -0.02 + 0.02 * j), tip]
                lead = _spline(ctrl, 10) + [0.006 * j, 0]
                metal.line(lead, 0.009, 0.65)
                if f.grade == "icd" and j == 0:  # shock coil: a thicker dense segment
                    metal.line(lead[-14:-3], 0.018, 0.9)
        elif f.type == "sternotomy":
            n = f.params.get("wires", 6)
            for j in range(n):
                vc = -0.52 + j * 0.7 / max(1, n - 1) + _u(rng, -0.01, 0.01)
                uc = sh + _u(rng, -0.012, 0.012)
                metal.ellipse((uc, vc), 0.03, 0.012, 0.0, outline=1.2, width=0.007)
                metal.line([(uc - 0.004, vc - 0.012), (uc + 0.004, vc - 0.03)], 0.007, 1.2)
    return tubes.array() + metal.array()
