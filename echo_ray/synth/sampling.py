"""Drawing studies and patients from named random streams.

`sample_finding` draws one finding (side, grade, rendering parameters), `sample_study` a
whole study (setting, views, anatomy, findings with their co-occurrences), `_sample_subject`
a patient's fake identity (`Subject`) for the archive's DICOM headers and dates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echo_ray.synth.chest import _lung_half_width
from echo_ray.synth.findings import (
    CONSOLIDATION_EXTENT,
    CTR_RANGES,
    EFFUSION_HEIGHT,
    ENTERIC_KINDS,
    ETT_TIP_CM,
    FINDING_TYPES,
    GRADE_PRIORS,
    LOBES,
    MASS_MM,
    MEDIASTINAL_WIDENING,
    MM_PER_UNIT,
    NODULE_MM,
    PATHOLOGY_TYPES,
    PNEUMOTHORAX_COLLAPSE,
    ZONES,
    Anatomy,
    Finding,
    StudySpec,
)
from echo_ray.synth.streams import _pick, _rng, _u


def sample_finding(type_: str, rng: np.random.Generator, *, side: str | None = None,
                   grade: str | None = None) -> Finding:
    """Draw one finding of `type_` with its side, grade and rendering parameters."""
    ft = FINDING_TYPES[type_]
    if side is None and ft.sides:
        side = _pick(rng, ft.sides, [0.4, 0.4, 0.2] if len(ft.sides) == 3 else None)
    if grade is None and ft.grades:
        grade = _pick(rng, ft.grades, GRADE_PRIORS.get(type_))
    f = Finding(type_, side=side, grade=grade)
    p = f.params
    if type_ == "cardiomegaly":
        p["ctr"] = _u(rng, *CTR_RANGES[grade])
    elif type_ == "enlarged_cardiomediastinum":
        p["widening"] = _u(rng, *MEDIASTINAL_WIDENING[grade])
    elif type_ == "pleural_effusion":
        f.location = "costophrenic angle" if grade == "small" else "base"
        for s in ("left", "right"):
            if side in (s, "bilateral"):
                p[f"height_{s}"] = _u(rng, *EFFUSION_HEIGHT[grade])
    elif type_ == "pneumothorax":
        f.location = "apex" if grade == "small" else "hemithorax"
        p["collapse"] = _u(rng, *PNEUMOTHORAX_COLLAPSE[grade])
        p["tension"] = bool(grade == "large" and rng.random() < 0.3)
    elif type_ in ("consolidation", "pneumonia"):
        lobes = [k for k, v in LOBES.items() if v[0] == side]
        f.location = _pick(rng, lobes)
        p["extent"] = _u(rng, *CONSOLIDATION_EXTENT[grade])
        p["du"], p["dv"] = _u(rng, -0.04, 0.04), _u(rng, -0.04, 0.04)
    elif type_ == "atelectasis":
        if side == "bilateral" and grade == "severe":  # bilateral collapse: too rare to draw
            f.grade = grade = "moderate"
        f.location = "lower lobe" if grade == "severe" else "base"
        p["angle"] = _u(rng, -12, 12)
        p["x"] = _u(rng, 0.3, 0.5)
        p["v"] = _u(rng, -0.14, -0.06)
        p["length"] = _u(rng, 0.16, 0.3)
    elif type_ in ("nodule", "mass"):
        lo, hi = (NODULE_MM if type_ == "nodule" else MASS_MM)[grade]
        f.size_mm = float(rng.integers(lo, hi + 1))
        zone = _pick(rng, ZONES)
        f.location = zone
        x, v = _lesion_position(rng, zone, f.size_mm)
        p["x"], p["v"], p["depth"] = x, v, _u(rng, -0.35, 0.35)
        p["lobulation"] = _u(rng, 0.0, 1.0)
    elif type_ == "pleural_other":
        if grade == "plaques":
            f.location = "plaques"
            p["count"] = int(rng.integers(3, 7))
        else:
            f.location = "apical" if side == "bilateral" or rng.random() < 0.6 else "lateral"
            p["thickness"] = _u(rng, 0.025, 0.045)
    elif type_ == "fracture":
        rib = int(rng.integers(3, 10))
        f.location = f"rib{rib}"
        p["rib"] = rib
        p["t"] = _u(rng, 0.5, 0.75)
    elif type_ == "endotracheal_tube":
        p["tip_cm"] = int(rng.integers(ETT_TIP_CM[grade][0], ETT_TIP_CM[grade][1] + 1))
        f.location = f"{p['tip_cm']} cm above carina"
    elif type_ == "enteric_tube":
        f.location = grade
        p["kind"] = _pick(rng, ENTERIC_KINDS)
    elif type_ in ("central_line", "picc"):
        f.location = grade
        if type_ == "central_line":
            p["access"] = _pick(rng, ("internal_jugular", "subclavian"), (0.7, 0.3))
    elif type_ == "pacemaker":
        p["leads"] = int(rng.integers(1, 3))
        f.location = f"{p['leads']} lead(s)"
    elif type_ == "sternotomy":
        p["wires"] = int(rng.integers(5, 8))
    return f


# Lung zones (canonical v ranges) and the lateral extent used when placing lesions.
_ZONE_V = {"upper": (-0.55, -0.22), "mid": (-0.18, 0.1), "lower": (0.12, 0.32)}


def _lesion_position(rng: np.random.Generator, zone: str, size_mm: float) -> tuple[float, float]:
    lo, hi = _ZONE_V[zone]
    v = _u(rng, lo, hi)
    # lateral position away from the mediastinum/heart and the chest wall
    xmin = 0.3 if zone != "upper" else 0.2
    r = size_mm / 2 / MM_PER_UNIT
    x = _u(rng, xmin + r * 0.5, max(xmin + r * 0.5 + 0.01, float(_lung_half_width(v)) - 0.06 - r))
    return x, v


# Co-occurrence: finding -> [(other type, probability, same side?)].
_COOCCURRENCE: dict[str, list[tuple[str, float, bool]]] = {
    "edema": [("cardiomegaly", 0.5, False), ("pleural_effusion", 0.4, False)],
    "pneumonia": [("pleural_effusion", 0.25, True)],
    "fracture": [("pneumothorax", 0.2, True)],
    "cardiomegaly": [("pacemaker", 0.12, False), ("sternotomy", 0.1, False)],
    "mass": [("pleural_effusion", 0.15, True)],
}
_EXCLUSIVE = ({"pneumonia", "consolidation"}, {"nodule", "mass"})


def sample_study(seed: int, index: int, *, subject_id: int = 10000000, study_id: int = 50000000,
                 sex: str | None = None, age: int | None = None,
                 lateral_fraction: float = 0.3, lateral_only_fraction: float = 0.0,
                 normal_fraction: float = 0.35, study_date: str = "21500101",
                 first_study: bool = True) -> StudySpec:
    """Draw one study: setting, views, anatomy and findings, from streams named by
    (seed, index) only, so studies are independent of each other and of the archive size.

    Args:
        lateral_fraction: probability of a lateral view beside the frontal one.
        lateral_only_fraction: probability of a study with a single lateral view.
        normal_fraction: probability of no pathology (devices may still be present).
    """
    rng = _rng(seed, "study", index)
    if sex is None:
        sex = _pick(rng, ("M", "F"))
    if age is None:
        age = int(rng.integers(21, 92))
    setting = _pick(rng, ("outpatient", "inpatient", "icu"), (0.5, 0.3, 0.2))
    if rng.random() < lateral_only_fraction:
        views: tuple[str, ...] = (_pick(rng, ("LATERAL", "LL"), (0.8, 0.2)),)
    else:
        ap = setting == "icu" or (setting == "inpatient" and rng.random() < 0.5)
        views = ("AP" if ap else "PA",)
        if rng.random() < lateral_fraction:
            views += (_pick(rng, ("LATERAL", "LL"), (0.8, 0.2)),)
    anatomy = _sample_anatomy(_rng(seed, "anatomy", index), sex, views[0] == "AP", age)
    findings = _sample_findings(_rng(seed, "findings", index), setting, normal_fraction)
    study_time = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}" \
                 f"{int(rng.integers(0, 60)):02d}"
    return StudySpec(seed=seed, index=index, subject_id=subject_id, study_id=study_id, sex=sex,
                     age=age, views=views, setting=setting, anatomy=anatomy, findings=findings,
                     study_date=study_date, study_time=study_time, first_study=first_study)


def _sample_anatomy(rng: np.random.Generator, sex: str, ap: bool, age: int) -> Anatomy:
    return Anatomy(
        scale=_u(rng, 0.95, 1.07) * (1.03 if ap else 1.0),
        aspect=_u(rng, 0.92, 1.08),
        rotation=float(rng.normal(0, 3.0 if ap else 1.6)),
        shift_u=_u(rng, -0.04, 0.04),
        shift_v=_u(rng, -0.05, 0.05),
        inspiration=_u(rng, 0.78, 1.0) if ap else _u(rng, 0.88, 1.1),
        ctr=_u(rng, *CTR_RANGES["normal"]) + (0.01 if age > 65 else 0.0),
        soft_tissue=_u(rng, 0.85, 1.3),
        breast=_u(rng, 0.3, 1.0) if sex == "F" else 0.0,
        spine_offset=float(rng.normal(0, 0.015)),
        exposure=float(rng.normal(0, 0.05)),
        contrast=_u(rng, 0.85, 1.15) * (0.9 if ap else 1.0),
        gamma=_u(rng, 0.85, 1.2),
        noise=_u(rng, 0.012, 0.03) * (1.35 if ap else 1.0),
        blur=_u(rng, 0.7, 1.4) * (1.2 if ap else 1.0),
        equalization=_u(rng, 0.35, 0.55),
        arms_up=_u(rng, 0.5, 1.0),
    )


def _sample_findings(rng: np.random.Generator, setting: str, normal_fraction: float
                     ) -> list[Finding]:
    findings: list[Finding] = []

    def add(type_: str, side: str | None = None) -> None:
        if any(f.type == type_ for f in findings):
            return
        for group in _EXCLUSIVE:
            if type_ in group and any(f.type in group for f in findings):
                return
        ft = FINDING_TYPES[type_]
        if side is not None and side not in ft.sides:
            side = None if not ft.sides else ("bilateral" if "bilateral" in ft.sides else None)
        f = sample_finding(type_, rng, side=side)
        # a pneumothorax and an effusion on one side would be a hydropneumothorax: avoid
        other = {"pneumothorax": "pleural_effusion", "pleural_effusion": "pneumothorax"}.get(type_)
        o = next((g for g in findings if g.type == other), None)
        if o is not None and (o.side == f.side or "bilateral" in (o.side, f.side)):
            return
        findings.append(f)

    if rng.random() >= normal_fraction:
        n = _pick(rng, (1, 2, 3, 4), (0.45, 0.3, 0.17, 0.08))
        weights = np.array([FINDING_TYPES[t].weight for t in PATHOLOGY_TYPES])
        for _ in range(n):
            add(_pick(rng, PATHOLOGY_TYPES, weights))
        for f in list(findings):
            for other, prob, same_side in _COOCCURRENCE.get(f.type, ()):
                if rng.random() < prob:
                    add(other, f.side if same_side else None)
    device_probs = {
        "outpatient": {"picc": 0.02, "pacemaker": 0.05, "sternotomy": 0.05},
        "inpatient": {"picc": 0.15, "central_line": 0.1, "enteric_tube": 0.1, "pacemaker": 0.06,
                      "sternotomy": 0.06},
        "icu": {"endotracheal_tube": 0.65, "enteric_tube": 0.6, "central_line": 0.5,
                "picc": 0.1, "pacemaker": 0.06, "sternotomy": 0.08},
    }[setting]
    for type_, prob in device_probs.items():
        if rng.random() < prob:
            side = _pick(rng, ("left", "right"), (0.85, 0.15)) if type_ == "pacemaker" else None
            add(type_, side)
    order = {t: i for i, t in enumerate(FINDING_TYPES)}
    return sorted(findings, key=lambda f: order[f.type])


# ---------------------------------------------------------------------------- subjects


_SYLLABLES = ("var", "lo", "me", "net", "ka", "ri", "dos", "tel", "an", "mo", "su", "bel",
              "quin", "ra", "vo", "li", "den", "sa", "tor", "ve", "mi", "nor", "ga", "phe")


def fake_name(rng: np.random.Generator) -> str:
    """An invented DICOM person name, 'Family^Given', from syllables (e.g. 'Varlo^Menet')."""
    def word(n: int) -> str:
        return "".join(_pick(rng, _SYLLABLES) for _ in range(n)).capitalize()

    return f"{word(int(rng.integers(2, 4)))}^{word(int(rng.integers(2, 3)))}"


@dataclass(frozen=True)
class Subject:
    """Fake identity of one patient (PHI to be protected downstream)."""

    subject_id: int
    name: str
    patient_id: str
    sex: str
    birth_date: str  # YYYYMMDD
    base_age: int
    first_date: int  # days since 2110-01-01 of the first study


def _sample_subject(seed: int, index: int, subject_id: int) -> Subject:
    rng = _rng(seed, "subject", index)
    sex = _pick(rng, ("M", "F"))
    age = int(rng.integers(21, 90))
    first = int(rng.integers(0, 80 * 365))
    birth = _date(first - age * 365 - int(rng.integers(0, 365)))
    return Subject(subject_id, fake_name(rng), f"{int(rng.integers(10**7, 10**8))}", sex,
                   birth, age, first)


def _date(days: int) -> str:
    """YYYYMMDD of `days` after 2110-01-01 (MIMIC-style shifted dates)."""
    d = np.datetime64("2110-01-01") + np.timedelta64(days, "D")
    return str(d).replace("-", "")
