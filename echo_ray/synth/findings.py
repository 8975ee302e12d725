"""Finding types and study specs: what a synthetic study holds, before any pixel or word.

`FINDING_TYPES` (each type's sides, grades and CheXpert label), the per-grade size ranges the
sampler and the renderer share, the `Finding` / `Anatomy` / `StudySpec` records, and
`chexpert_labels` (the labels the true findings imply).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from echo_ray.text.labels import CHEXPERT_LABELS, LABEL_HIERARCHY, NEGATIVE, POSITIVE


@dataclass(frozen=True)
class FindingType:
    """One kind of finding the phantom can show.

    Attributes:
        name: the key used everywhere (ground truth, templates).
        label: the CheXpert observation it makes positive.
        sides: allowed `Finding.side` values; () when the finding has no side.
        grades: allowed `Finding.grade` values, mildest / most subtle first.
        weight: relative prior among pathological findings (0 for devices, drawn apart).
        device: a support device rather than a pathology.
    """

    name: str
    label: str
    sides: tuple[str, ...]
    grades: tuple[str, ...]
    weight: float = 0.0
    device: bool = False


_LR = ("left", "right")
_LRB = ("left", "right", "bilateral")

FINDING_TYPES: dict[str, FindingType] = {
    ft.name: ft
    for ft in (
        FindingType("cardiomegaly", "Cardiomegaly", (), ("mild", "moderate", "severe"), 0.13),
        FindingType(
            "enlarged_cardiomediastinum",
            "Enlarged Cardiomediastinum",
            (),
            ("mild", "moderate", "severe"),
            0.05,
        ),
        FindingType("pleural_effusion", "Pleural Effusion", _LRB, ("small", "moderate", "large"),
                    0.17),
        FindingType("pneumothorax", "Pneumothorax", _LR, ("small", "moderate", "large"), 0.07),
        FindingType("consolidation", "Consolidation", _LR, ("small", "moderate", "large"), 0.08),
        FindingType("pneumonia", "Pneumonia", _LR, ("small", "moderate", "large"), 0.07),
        FindingType("atelectasis", "Atelectasis", _LRB, ("mild", "moderate", "severe"), 0.13),
        FindingType("edema", "Edema", (), ("mild", "moderate", "severe"), 0.09),
        FindingType("nodule", "Lung Lesion", _LR, ("small", "medium", "large"), 0.06),
        FindingType("mass", "Lung Lesion", _LR, ("small", "medium", "large"), 0.03),
        FindingType("pleural_other", "Pleural Other", _LRB, ("thickening", "plaques"), 0.04),
        FindingType("fracture", "Fracture", _LR, ("nondisplaced", "displaced", "healing"), 0.05),
        FindingType("endotracheal_tube", "Support Devices", (), ("high", "standard", "low"),
                    device=True),
        FindingType("enteric_tube", "Support Devices", (), ("esophagus", "stomach"), device=True),
        FindingType("central_line", "Support Devices", _LR, ("mid_svc", "cavoatrial", "atrium"),
                    device=True),
        FindingType("picc", "Support Devices", _LR, ("mid_svc", "cavoatrial", "atrium"),
                    device=True),
        FindingType("pacemaker", "Support Devices", _LR, ("pacemaker", "icd"), device=True),
        FindingType("sternotomy", "Support Devices", (), (), device=True),
    )
}
PATHOLOGY_TYPES: tuple[str, ...] = tuple(n for n, t in FINDING_TYPES.items() if not t.device)
DEVICE_TYPES: tuple[str, ...] = tuple(n for n, t in FINDING_TYPES.items() if t.device)
LUNG_OPACITY_TYPES = frozenset({"consolidation", "pneumonia", "atelectasis", "edema", "nodule",
                                "mass"})  # the finding types behind "Lung Opacity"

# Lobe key -> (side, noun phrase, attributive form). Also the render region (_LOBE_REGIONS).
LOBES: dict[str, tuple[str, str, str]] = {
    "rul": ("right", "right upper lobe", "right upper lobe"),
    "rml": ("right", "right middle lobe", "right middle lobe"),
    "rll": ("right", "right lower lobe", "right lower lobe"),
    "lul": ("left", "left upper lobe", "left upper lobe"),
    "lingula": ("left", "lingula", "lingular"),
    "lll": ("left", "left lower lobe", "left lower lobe"),
}
ZONES = ("upper", "mid", "lower")
RIB_ORDINALS: dict[int, tuple[str, str]] = {
    3: ("third", "3rd"), 4: ("fourth", "4th"), 5: ("fifth", "5th"), 6: ("sixth", "6th"),
    7: ("seventh", "7th"), 8: ("eighth", "8th"), 9: ("ninth", "9th"), 10: ("tenth", "10th"),
}
ENTERIC_KINDS = ("nasogastric", "orogastric", "enteric")

# Prior over each type's grades (FindingType.grades order); milder grades are commoner.
GRADE_PRIORS: dict[str, tuple[float, ...]] = {
    **{t: (0.45, 0.35, 0.2) for t in ("cardiomegaly", "enlarged_cardiomediastinum",
                                      "pleural_effusion", "pneumothorax", "consolidation",
                                      "pneumonia", "atelectasis", "edema")},
    "nodule": (0.35, 0.4, 0.25), "mass": (0.4, 0.35, 0.25), "pleural_other": (0.6, 0.4),
    "fracture": (0.4, 0.3, 0.3), "endotracheal_tube": (0.12, 0.76, 0.12),
    "enteric_tube": (0.15, 0.85), "central_line": (0.3, 0.5, 0.2), "picc": (0.3, 0.5, 0.2),
    "pacemaker": (0.7, 0.3),
}

# Size of the graded parameters, per grade: (low, high), sampled uniformly.
CTR_RANGES = {"normal": (0.40, 0.49), "mild": (0.53, 0.57), "moderate": (0.58, 0.63),
              "severe": (0.64, 0.72)}
MEDIASTINAL_WIDENING = {"mild": (1.35, 1.5), "moderate": (1.55, 1.75), "severe": (1.8, 2.1)}
EFFUSION_HEIGHT = {"small": (0.07, 0.12), "moderate": (0.2, 0.32), "large": (0.45, 0.65)}
PNEUMOTHORAX_COLLAPSE = {"small": (0.12, 0.2), "moderate": (0.2, 0.3), "large": (0.38, 0.5)}
CONSOLIDATION_EXTENT = {"small": (0.5, 0.62), "moderate": (0.72, 0.85), "large": (0.95, 1.15)}
NODULE_MM = {"small": (6, 9), "medium": (10, 19), "large": (20, 29)}
MASS_MM = {"small": (30, 44), "medium": (45, 59), "large": (60, 80)}
ETT_TIP_CM = {"low": (1, 2), "standard": (3, 6), "high": (7, 9)}
MM_PER_UNIT = 190.0  # canonical unit -> mm for an average adult (thorax ~300 mm wide)


# ---------------------------------------------------------------------------- study specs


@dataclass
class Finding:
    """One finding in one study.

    Attributes:
        type: a key of FINDING_TYPES.
        side: "left" / "right" / "bilateral" (patient's side) or None.
        grade: one of the type's grades (severity, size class, kind or position).
        size_mm: lesion size (nodule/mass) in mm.
        location: lobe key, lung zone, rib level, device tip ... (see `params`).
        params: numeric rendering parameters; missing ones take grade defaults.
    """

    type: str
    side: str | None = None
    grade: str | None = None
    size_mm: float | None = None
    location: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ft = FINDING_TYPES.get(self.type)
        if ft is None:
            raise ValueError(f"unknown finding type {self.type!r}; known: {sorted(FINDING_TYPES)}")
        if ft.sides and self.side not in ft.sides:
            raise ValueError(f"{self.type} needs side in {ft.sides}, got {self.side!r}")
        if ft.grades and self.grade not in ft.grades:
            raise ValueError(f"{self.type} needs grade in {ft.grades}, got {self.grade!r}")

    @property
    def label(self) -> str:
        return FINDING_TYPES[self.type].label

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "label": self.label,
            "side": self.side,
            "grade": self.grade,
            "grade_index": FINDING_TYPES[self.type].grades.index(self.grade)
            if self.grade is not None
            else None,
            "size_mm": self.size_mm,
            "location": self.location,
            "params": {k: _round(v) for k, v in sorted(self.params.items())},
        }


@dataclass(frozen=True)
class Anatomy:
    """Per-study patient habitus, pose and acquisition (all findings-independent)."""

    scale: float = 1.0  # thorax size in the frame
    aspect: float = 1.0  # width / height of the thorax
    rotation: float = 0.0  # in-plane tilt, degrees
    shift_u: float = 0.0
    shift_v: float = 0.0
    inspiration: float = 1.0  # < 0.9: low lung volumes (diaphragm higher)
    ctr: float = 0.45  # cardiothoracic ratio without cardiomegaly
    soft_tissue: float = 1.0  # body habitus (soft-tissue thickness)
    breast: float = 0.0  # 0 (male) .. 1
    spine_offset: float = 0.0  # axial rotation: spinous processes off the midline
    exposure: float = 0.0  # display offset
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.02  # quantum noise level
    blur: float = 1.0  # detector blur sigma in pixels at 512
    equalization: float = 0.35  # strength of the dynamic-range compression
    arms_up: float = 0.0  # lateral views: arm soft tissue over the upper chest


@dataclass
class StudySpec:
    """Everything needed to render, report and label one study (no pixels)."""

    seed: int
    index: int  # study index in the archive: with seed, names every random stream
    subject_id: int
    study_id: int
    sex: str  # "M" / "F"
    age: int
    views: tuple[str, ...]  # ViewPosition per image: "PA" / "AP" then "LATERAL" / "LL"
    setting: str  # "outpatient" / "inpatient" / "icu"
    anatomy: Anatomy
    findings: list[Finding] = field(default_factory=list)
    study_date: str = "21500101"
    study_time: str = "120000"
    first_study: bool = True

    def has(self, type_: str) -> bool:
        return any(f.type == type_ for f in self.findings)

    def get(self, type_: str) -> Finding | None:
        return next((f for f in self.findings if f.type == type_), None)

    def with_findings(self, findings: Iterable[Finding]) -> StudySpec:
        """A copy with other findings: same patient, pose and noise (for A/B renders)."""
        return dataclasses.replace(self, findings=list(findings))


def chexpert_labels(findings: Iterable[Finding]) -> dict[str, float]:
    """The 14 CheXpert labels (POSITIVE / NEGATIVE) implied by the true findings, with the
    CheXpert hierarchy applied (text.labels.LABEL_HIERARCHY); "No Finding" iff nothing but
    devices."""
    types = {f.type for f in findings}
    present = {FINDING_TYPES[t].label for t in types}
    for parent, children in LABEL_HIERARCHY.items():
        if present & set(children):
            present.add(parent)
    if not (types - set(DEVICE_TYPES)):
        present.add("No Finding")
    return {name: POSITIVE if name in present else NEGATIVE for name in CHEXPERT_LABELS}


def _round(x: Any) -> Any:
    """Floats (also inside lists) rounded to 4 places, as the ground truth writes them."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x
