"""Synthetic chest X-ray archive: phantom radiographs, radiologist-style reports, labels.

The project's embedded data set for quickstart, tests and benchmarks (no real CXR data can be
downloaded here). `synthesize_archive` writes a MIMIC-CXR-shaped archive::

    files/pXX/pSUBJECT/sSTUDY/<dicom_id>.dcm   real DICOM (mixed syntaxes, MONOCHROME1/2, ...)
    files/pXX/pSUBJECT/sSTUDY.txt              the free-text report (reporting by exception)
    metadata.csv  split.csv  chexpert.csv      as MIMIC-CXR(-JPG), labels = the TRUE findings
    ground_truth.jsonl                         per study: every finding with side/grade/size/...
    synth_config.json                          the options the archive was made with

Three parts, each usable alone (tests render one study with and without a finding):

- `sample_study` draws a `StudySpec` (patient, pose, habitus, views, findings) from a seed;
- `render_view` turns a spec into a float image in [0, 1] (bright = dense) in which the
  findings are visible: a physically-inspired attenuation map (soft tissue, air, bone, metal)
  through a detector model (blur, quantum noise, dynamic-range compression);
- `write_report` turns a spec into a MIMIC-style report. Every sentence comes from the
  module-level template tables (`FINDING_TEMPLATES`, `IMPRESSION_TEMPLATES`,
  `NEGATIVE_TEMPLATES`, ...) with slots from `SLOT_VALUES`: that is the report grammar, and
  `is_well_formed` checks a sentence against it.

Coordinates: a canonical chest frame, u horizontal (-1 image left .. +1 image right) and v
vertical (-1 top .. +1 bottom). Frontal views are shown as radiologists read them: the
patient's RIGHT is on the image LEFT (u < 0). On laterals u runs anterior (-) to posterior (+).
A per-study pose (scale, aspect, tilt, shift) maps the canonical frame onto pixels.

numpy + Pillow only; DICOM goes through `echo_ray.dicom`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import re
import shutil
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from echo_ray.data.dicom import TRANSFER_SYNTAXES, make_uid, write_dicom
from echo_ray.text.labels import CHEXPERT_LABELS, LABEL_HIERARCHY, NEGATIVE, POSITIVE

# ============================================================================ finding types


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

# ============================================================================ report grammar
# Every sentence a synthetic report can contain is one of these templates with its {slots}
# filled from SLOT_VALUES ({Slot} = the value with a capital first letter). The tables are
# the grammar that `is_well_formed` and the evaluation's well-formedness rate enumerate.

FINDING_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "cardiomegaly": {
        "any": (
            "{Grade} cardiomegaly.",
            "The heart is {gradely} enlarged.",
            "Heart size is {gradely} enlarged.",
            "The cardiac silhouette is {gradely} enlarged.",
            "There is {grade} enlargement of the cardiac silhouette.",
        ),
    },
    "enlarged_cardiomediastinum": {
        "any": (
            "The mediastinum is {gradely} widened.",
            "{Grade} widening of the superior mediastinum.",
            "The cardiomediastinal silhouette is {gradely} widened.",
            "There is {grade} widening of the mediastinal contours.",
        ),
    },
    "pleural_effusion": {
        "unilateral": (
            "{Size} {side} pleural effusion.",
            "There is a {size} {side} pleural effusion.",
            "{Side} pleural effusion, {size} in size.",
            "A {size} {side} pleural effusion is present.",
            "{Size} {side} pleural effusion is noted.",
        ),
        "unilateral_small": (
            "Blunting of the {side} costophrenic angle is consistent with a small pleural"
            " effusion.",
            "Small {side} pleural effusion blunts the costophrenic angle.",
        ),
        "unilateral_large": (
            "Large {side} pleural effusion with a meniscus reaching the mid hemithorax.",
        ),
        "bilateral": (
            "{Size} bilateral pleural effusions.",
            "There are {size} bilateral pleural effusions.",
            "Bilateral pleural effusions, {size} in size.",
            "{Size} pleural effusions are present bilaterally.",
        ),
    },
    "pneumothorax": {
        "any": (
            "{Size} {side} pneumothorax.",
            "There is a {size} {side} pneumothorax.",
            "{Side} pneumothorax, {size} in size.",
            "A {size} {side} pneumothorax is present.",
        ),
        "small": (
            "Small {side} apical pneumothorax.",
            "There is a small {side} apical pneumothorax.",
        ),
        "tension": (
            "{Size} {side} tension pneumothorax with {contra} tracheal deviation.",
            "{Side} tension pneumothorax, {size} in size, with {contra} tracheal deviation.",
        ),
    },
    "consolidation": {
        "any": (
            "{Extent} consolidation in the {lobe}.",
            "There is {extent} consolidation in the {lobe}.",
            "Consolidation is present in the {lobe}.",
            "{Extent} {lobe_adj} consolidation.",
            "Airspace consolidation in the {lobe}.",
        ),
    },
    "pneumonia": {
        "any": (
            "{Extent} opacity in the {lobe} consistent with pneumonia.",
            "There is {extent} airspace opacity in the {lobe}, consistent with pneumonia.",
            "{Lobe_adj} pneumonia.",
            "Findings are consistent with {lobe_adj} pneumonia.",
            "Opacity in the {lobe} compatible with pneumonia.",
        ),
    },
    "atelectasis": {
        "unilateral_mild": (
            "Mild {side} basilar atelectasis.",
            "Minimal atelectasis at the {side} lung base.",
            "Linear atelectasis at the {side} lung base.",
            "There is mild atelectasis at the {side} base.",
        ),
        "unilateral_moderate": (
            "Plate-like atelectasis at the {side} lung base.",
            "Moderate {side} basilar atelectasis.",
            "There is plate-like atelectasis in the {side} lower lung.",
        ),
        "unilateral_severe": (
            "{Side} lower lobe collapse.",
            "Complete atelectasis of the {side} lower lobe.",
            "Severe {side} lower lobe atelectasis with volume loss.",
        ),
        "bilateral_mild": (
            "Mild bibasilar atelectasis.",
            "Minimal bibasilar atelectasis.",
            "Linear atelectasis at both lung bases.",
        ),
        "bilateral_moderate": (
            "Moderate bibasilar atelectasis.",
            "Plate-like atelectasis at both lung bases.",
        ),
        "bilateral_severe": (
            "Severe bibasilar atelectasis.",
            "Bilateral lower lobe collapse.",
        ),
    },
    "edema": {
        "mild": (
            "{Grade} pulmonary edema.",
            "There is mild interstitial pulmonary edema.",
            "Mild pulmonary vascular congestion and interstitial edema.",
        ),
        "moderate": (
            "{Grade} pulmonary edema.",
            "There is moderate pulmonary edema.",
            "Moderate interstitial and alveolar pulmonary edema.",
        ),
        "severe": (
            "{Grade} pulmonary edema.",
            "There is severe pulmonary edema with bilateral airspace opacities.",
            "Severe alveolar pulmonary edema.",
        ),
    },
    "nodule": {
        "any": (
            "A {mm} mm nodule in the {side} {zone} lung zone.",
            "There is a {mm} mm nodular opacity in the {side} {zone} lung.",
            "{mm} mm nodule projects over the {side} {zone} lung.",
            "A {side} {zone} lung nodule measures {mm} mm.",
        ),
    },
    "mass": {
        "any": (
            "A {cm} cm mass in the {side} {zone} lung zone.",
            "There is a {cm} cm {side} {zone} lung mass.",
            "{Side} {zone} lung mass measuring {cm} cm.",
        ),
    },
    "pleural_other": {
        "thickening_apical": (
            "{Side} apical pleural thickening.",
            "There is {side} apical pleural thickening.",
            "Pleural thickening at the {side} apex.",
        ),
        "thickening_lateral": (
            "Pleural thickening along the {side} lateral chest wall.",
            "{Side} lateral pleural thickening.",
        ),
        "thickening_bilateral": (
            "Bilateral apical pleural thickening.",
            "Apical pleural thickening bilaterally.",
        ),
        "plaques_unilateral": (
            "Calcified {side} pleural plaques.",
            "Calcified pleural plaques along the {side} hemithorax.",
        ),
        "plaques_bilateral": (
            "Calcified pleural plaques bilaterally.",
            "Bilateral calcified pleural plaques.",
            "There are bilateral calcified pleural plaques.",
        ),
    },
    "fracture": {
        "nondisplaced": (
            "Nondisplaced fracture of the {side} {rib} rib.",
            "There is a nondisplaced fracture of the lateral {side} {rib} rib.",
            "Acute nondisplaced {side} {rib} rib fracture.",
        ),
        "displaced": (
            "Displaced fracture of the {side} {rib} rib.",
            "There is a displaced fracture of the lateral {side} {rib} rib.",
            "Acute displaced {side} {rib} rib fracture.",
        ),
        "healing": (
            "Healing fracture of the {side} {rib} rib.",
            "There is a healing {side} {rib} rib fracture.",
            "Healing fracture of the lateral {side} {rib} rib with callus formation.",
        ),
    },
    "endotracheal_tube": {
        "any": (
            "Endotracheal tube terminates {cm} cm above the carina.",
            "The endotracheal tube tip is {cm} cm above the carina.",
            "ET tube tip lies {cm} cm above the carina.",
        ),
        "standard": (
            "Endotracheal tube is in standard position, {cm} cm above the carina.",
            "The endotracheal tube is in appropriate position.",
        ),
        "low": ("Endotracheal tube tip is low, {cm} cm above the carina.",),
        "high": ("Endotracheal tube tip is high, {cm} cm above the carina.",),
    },
    "enteric_tube": {
        "stomach": (
            "Enteric tube courses below the diaphragm with tip in the stomach.",
            "{Kind} tube terminates in the stomach.",
            "A {kind} tube is seen with tip in the stomach.",
            "The {kind} tube tip is in the stomach.",
        ),
        "esophagus": (
            "{Kind} tube terminates in the distal esophagus.",
            "The {kind} tube tip is in the distal esophagus and should be advanced.",
        ),
    },
    "central_line": {
        "internal_jugular": (
            "{Side} internal jugular central venous catheter terminates in the {tip}.",
            "{Side} IJ central line tip is in the {tip}.",
            "A {side} internal jugular central line ends in the {tip}.",
        ),
        "subclavian": (
            "{Side} subclavian central venous catheter terminates in the {tip}.",
            "A {side} subclavian central line ends in the {tip}.",
            "{Side} subclavian central line tip is in the {tip}.",
        ),
    },
    "picc": {
        "any": (
            "{Side} PICC line terminates in the {tip}.",
            "{Side}-sided PICC with tip in the {tip}.",
            "A {side} upper extremity PICC ends in the {tip}.",
            "{Side} arm PICC tip is in the {tip}.",
        ),
    },
    "pacemaker": {
        "pacemaker_1": (
            "{Side}-sided single-lead pacemaker with lead in the right ventricle.",
            "A {side} chest wall pacemaker is present with a single lead in the right ventricle.",
        ),
        "pacemaker_2": (
            "{Side}-sided dual-chamber pacemaker with leads in the right atrium and right"
            " ventricle.",
            "A {side} chest wall pacemaker is present with leads terminating in the right atrium"
            " and right ventricle.",
            "Dual-lead {side}-sided pacemaker with leads in the right atrium and right"
            " ventricle.",
        ),
        "icd_1": (
            "{Side}-sided ICD with lead terminating in the right ventricle.",
            "A {side} chest wall defibrillator device with a single lead in the right ventricle.",
        ),
        "icd_2": (
            "{Side}-sided ICD with leads in the right atrium and right ventricle.",
            "A {side} chest wall defibrillator device is present with leads in the right atrium"
            " and right ventricle.",
        ),
    },
    "sternotomy": {
        "any": (
            "Median sternotomy wires are intact.",
            "The patient is status post median sternotomy.",
            "Intact median sternotomy wires.",
            "Median sternotomy wires are noted.",
        ),
    },
}

# Shorter statements for the IMPRESSION section (same variant keys as FINDING_TEMPLATES).
IMPRESSION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "cardiomegaly": {"any": ("{Grade} cardiomegaly.", "Cardiomegaly, {grade}.")},
    "enlarged_cardiomediastinum": {
        "any": ("{Grade} mediastinal widening.", "Widened mediastinum.")
    },
    "pleural_effusion": {
        "unilateral": ("{Size} {side} pleural effusion.", "{Side} pleural effusion, {size}."),
        "bilateral": ("{Size} bilateral pleural effusions.", "Bilateral pleural effusions."),
    },
    "pneumothorax": {
        "any": ("{Size} {side} pneumothorax.", "{Side} pneumothorax."),
        "tension": ("{Side} tension pneumothorax.",),
    },
    "consolidation": {
        "any": ("{Lobe_adj} consolidation.", "{Extent} consolidation in the {lobe}.")
    },
    "pneumonia": {"any": ("{Lobe_adj} pneumonia.", "Pneumonia in the {lobe}.")},
    "atelectasis": {
        "unilateral_mild": ("{Side} basilar atelectasis.",),
        "unilateral_moderate": ("{Side} basilar atelectasis.",),
        "unilateral_severe": ("{Side} lower lobe collapse.",),
        "bilateral_mild": ("Bibasilar atelectasis.",),
        "bilateral_moderate": ("Bibasilar atelectasis.",),
        "bilateral_severe": ("Bibasilar atelectasis.",),
    },
    "edema": {
        "mild": ("{Grade} pulmonary edema.",),
        "moderate": ("{Grade} pulmonary edema.",),
        "severe": ("{Grade} pulmonary edema.",),
    },
    "nodule": {
        "any": ("{Side} {zone} lung nodule measuring {mm} mm.", "{mm} mm {side} {zone} lung"
                " nodule.")
    },
    "mass": {"any": ("{Side} {zone} lung mass.", "{cm} cm {side} {zone} lung mass.")},
    "pleural_other": {
        "thickening_apical": ("{Side} pleural thickening.",),
        "thickening_lateral": ("{Side} pleural thickening.",),
        "thickening_bilateral": ("Bilateral pleural thickening.",),
        "plaques_unilateral": ("Calcified pleural plaques.",),
        "plaques_bilateral": ("Calcified pleural plaques.",),
    },
    "fracture": {
        "nondisplaced": ("Acute {side} {rib} rib fracture.", "{Side} {rib} rib fracture."),
        "displaced": ("Acute {side} {rib} rib fracture.", "{Side} {rib} rib fracture."),
        "healing": ("Healing {side} {rib} rib fracture.",),
    },
    "endotracheal_tube": {
        "standard": ("Endotracheal tube in standard position.",),
        "low": ("Low-lying endotracheal tube.",),
        "high": ("Endotracheal tube tip is high, {cm} cm above the carina.",),
    },
    "enteric_tube": {"esophagus": ("{Kind} tube tip in the distal esophagus.",)},
}

# Pertinent negatives and normal statements: concept -> (templates, findings that forbid it).
NEGATIVE_TEMPLATES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "pneumothorax": (
        ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."),
        frozenset({"pneumothorax"}),
    ),
    "effusion": (
        ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusions."),
        frozenset({"pleural_effusion"}),
    ),
    "effusion_pneumothorax": (
        (
            "No pleural effusion or pneumothorax.",
            "There is no pleural effusion or pneumothorax.",
            "No effusion or pneumothorax.",
        ),
        frozenset({"pleural_effusion", "pneumothorax"}),
    ),
    "consolidation": (
        (
            "No focal consolidation.",
            "There is no focal consolidation.",
            "No focal consolidation is seen.",
        ),
        frozenset({"consolidation", "pneumonia"}),
    ),
    "edema": (
        ("No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema."),
        frozenset({"edema"}),
    ),
    "heart": (
        (
            "Heart size is normal.",
            "The heart size is normal.",
            "The cardiac silhouette is normal in size.",
            "Normal heart size.",
        ),
        frozenset({"cardiomegaly"}),
    ),
    "cardiomediastinal": (
        (
            "The cardiomediastinal silhouette is normal.",
            "Cardiomediastinal and hilar contours are normal.",
            "The cardiomediastinal and hilar contours are within normal limits.",
        ),
        frozenset({"cardiomegaly", "enlarged_cardiomediastinum"}),
    ),
    "mediastinum": (
        ("The mediastinal contours are normal.", "Mediastinal contours are within normal limits."),
        # cardiomegaly enlarges the cardiomediastinal silhouette too (CheXpert's hierarchy)
        frozenset({"cardiomegaly", "enlarged_cardiomediastinum"}),
    ),
    "bones": (
        (
            "No acute osseous abnormality.",
            "No displaced rib fracture is seen.",
            "The osseous structures are unremarkable.",
        ),
        frozenset({"fracture"}),
    ),
}
# "Lungs clear" when no lung/pleural finding, "otherwise clear" beside a focal one.
LUNG_FINDINGS = frozenset({"consolidation", "pneumonia", "atelectasis", "edema", "nodule", "mass",
                           "pleural_effusion", "pneumothorax", "pleural_other"})
NORMAL_LUNG_TEMPLATES: dict[str, tuple[str, ...]] = {
    "clear": ("The lungs are clear.", "Lungs are clear.", "The lungs are well expanded and clear."),
    "otherwise_clear": ("The lungs are otherwise clear.", "Lungs are otherwise clear."),
}
FRAMING_TEMPLATES: dict[str, tuple[str, ...]] = {
    "pa_lat": (
        "PA and lateral views of the chest provided.",
        "PA and lateral views of the chest were obtained.",
    ),
    "ap_lat": ("AP and lateral views of the chest provided.",),
    "pa": ("PA view of the chest provided.",),
    "ap": (
        "Single portable AP view of the chest.",
        "Portable AP upright view of the chest provided.",
        "Portable semi-upright AP view of the chest.",
    ),
    "lat": ("Single lateral view of the chest provided.",),
}
EXTRA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "low_volumes": ("Lung volumes are low.", "Low lung volumes.", "The lung volumes are low."),
    "kerley": ("Kerley B lines are present.", "There are septal lines at the lung bases."),
}
IMPRESSION_NORMAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "no_acute": (
        "No acute cardiopulmonary process.",
        "No acute cardiopulmonary abnormality.",
        "No acute intrathoracic process.",
    ),
    "normal": ("Normal chest radiograph.",),
    "devices": ("Support devices as described above.", "Lines and tubes as described."),
}
# (No abbreviations with periods: a sentence ends at its only period.)
ADDENDUM_TEMPLATES: tuple[str, ...] = (
    "Findings were discussed with ___ by telephone at ___ on ___.",
    "The findings were communicated to the referring clinician, ___, at ___.",
    "The ordering physician, ___, was notified of the findings at ___ on ___.",
)
# Header sections (not part of the FINDINGS/IMPRESSION grammar, but tables all the same).
EXAMINATION_TEXT = {"pa_lat": "CHEST (PA AND LAT)", "ap_lat": "CHEST (AP AND LAT)",
                    "pa": "CHEST (PA)", "ap": "CHEST (PORTABLE AP)", "lat": "CHEST (LATERAL)"}
TECHNIQUE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "pa_lat": ("Chest PA and lateral.", "PA and lateral views of the chest."),
    "ap_lat": ("Chest AP and lateral.",),
    "pa": ("Chest PA.", "Single PA view of the chest."),
    "ap": ("Portable AP chest radiograph.", "Single frontal view of the chest."),
    "lat": ("Single lateral view of the chest.",),
}
INDICATION_TEMPLATES: tuple[str, ...] = (
    "___-year-old {man} with {reason}.",
    "___ year old {man} with {reason}.",
    "History: ___{sex} with {reason}",
    "___{sex} with {reason}.  Evaluate for acute process.",
)
INDICATION_REASONS: dict[str, tuple[str, ...]] = {
    "general": ("shortness of breath", "cough", "chest pain", "fever and cough",
                "dyspnea on exertion", "weakness", "preoperative evaluation", "hypoxia"),
    "icu": ("intubation, assess tube position", "line placement", "respiratory failure",
            "hypoxia, intubated"),
    "trauma": ("fall and chest wall pain", "trauma, chest pain"),
    "cardiac": ("device check", "history of cardiac surgery, dyspnea"),
}
COMPARISON_TEMPLATES: dict[str, tuple[str, ...]] = {
    "first": ("None.",),
    "prior": ("___.", "Chest radiograph from ___.", "Prior study from ___."),
}

# Words per graded slot: finding type -> grade -> slot -> options.
GRADE_WORDS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "cardiomegaly": {
        "mild": {"grade": ("mild",), "gradely": ("mildly",)},
        "moderate": {"grade": ("moderate",), "gradely": ("moderately",)},
        "severe": {"grade": ("severe", "marked"), "gradely": ("severely", "markedly")},
    },
    "enlarged_cardiomediastinum": {
        "mild": {"grade": ("mild",), "gradely": ("mildly",)},
        "moderate": {"grade": ("moderate",), "gradely": ("moderately",)},
        "severe": {"grade": ("marked",), "gradely": ("markedly",)},
    },
    "edema": {g: {"grade": (g,)} for g in ("mild", "moderate", "severe")},
    "pleural_effusion": {g: {"size": (g,)} for g in ("small", "moderate", "large")},
    "pneumothorax": {g: {"size": (g,)} for g in ("small", "moderate", "large")},
    "consolidation": {
        "small": {"extent": ("focal",)},
        "moderate": {"extent": ("patchy",)},
        "large": {"extent": ("extensive", "dense")},
    },
    "pneumonia": {
        "small": {"extent": ("focal",)},
        "moderate": {"extent": ("patchy",)},
        "large": {"extent": ("extensive", "dense")},
    },
}
TIP_WORDS: dict[str, tuple[str, ...]] = {
    "mid_svc": ("mid SVC", "mid superior vena cava"),
    "cavoatrial": ("cavoatrial junction",),
    "atrium": ("right atrium",),
}
ENTERIC_KINDS = ("nasogastric", "orogastric", "enteric")

# Slot -> every value it can take (a regular expression for numbers).
SLOT_VALUES: dict[str, tuple[str, ...] | str] = {
    "side": ("left", "right"),
    "contra": ("leftward", "rightward"),
    "grade": ("mild", "moderate", "severe", "marked"),
    "gradely": ("mildly", "moderately", "severely", "markedly"),
    "size": ("small", "moderate", "large"),
    "extent": ("focal", "patchy", "extensive", "dense"),
    "lobe": tuple(v[1] for v in LOBES.values()),
    "lobe_adj": tuple(v[2] for v in LOBES.values()),
    "zone": ZONES,
    "rib": tuple(w for pair in RIB_ORDINALS.values() for w in pair),
    "tip": tuple(w for words in TIP_WORDS.values() for w in words),
    "kind": ENTERIC_KINDS,
    "mm": r"\d{1,2}",
    "cm": r"\d{1,2}",
}

# Lower-case phrases of which every positive statement of a type contains at least one
# (tests and evaluation use them to find a finding's mention in a report).
FINDING_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly", "heart", "cardiac silhouette"),
    "enlarged_cardiomediastinum": ("mediastin",),
    "pleural_effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "pneumonia": ("pneumonia",),
    "atelectasis": ("atelectasis", "collapse"),
    "edema": ("edema",),
    "nodule": ("nodul",),
    "mass": ("mass",),
    "pleural_other": ("pleural thickening", "pleural plaque"),
    "fracture": ("fracture",),
    "endotracheal_tube": ("endotracheal", "et tube"),
    "enteric_tube": ("enteric", "nasogastric", "orogastric"),
    "central_line": ("central venous catheter", "central line"),
    "picc": ("picc",),
    "pacemaker": ("pacemaker", "icd", "defibrillator"),
    "sternotomy": ("sternotomy",),
}


def _all_body_templates() -> list[str]:
    out: list[str] = []
    for table in (FINDING_TEMPLATES, IMPRESSION_TEMPLATES):
        for variants in table.values():
            for templates in variants.values():
                out.extend(templates)
    for templates, _ in NEGATIVE_TEMPLATES.values():
        out.extend(templates)
    for table in (NORMAL_LUNG_TEMPLATES, FRAMING_TEMPLATES, EXTRA_TEMPLATES,
                  IMPRESSION_NORMAL_TEMPLATES):
        for templates in table.values():
            out.extend(templates)
    out.extend(ADDENDUM_TEMPLATES)
    return sorted(set(out))


def report_templates() -> tuple[str, ...]:
    """Every FINDINGS / IMPRESSION / ADDENDUM sentence template (sorted, unique)."""
    return tuple(_all_body_templates())


def _slot_regex(name: str) -> str:
    key = name if name in SLOT_VALUES else name[:1].lower() + name[1:]
    values = SLOT_VALUES[key]
    if isinstance(values, str):
        return f"(?:{values})"
    if key != name:
        values = tuple(_cap(v) for v in values)
    return "(?:" + "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)) + ")"


def template_regex(template: str) -> str:
    """The regular expression (full match) of the sentences one template produces."""
    parts = re.split(r"(\{\w+\})", template)
    return "".join(_slot_regex(p[1:-1]) if p.startswith("{") else re.escape(p) for p in parts)


@lru_cache(maxsize=1)
def _grammar() -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{template_regex(t)})" for t in _all_body_templates()))


def is_well_formed(sentence: str) -> bool:
    """Whether `sentence` (one sentence, its final period included) is in the report grammar.

    Whitespace runs are collapsed first (reports are wrapped at 78 columns).
    """
    return _grammar().fullmatch(" ".join(sentence.split())) is not None


# ============================================================================ study specs


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
    CheXpert hierarchy applied (reports.LABEL_HIERARCHY); "No Finding" iff nothing but devices."""
    types = {f.type for f in findings}
    present = {FINDING_TYPES[t].label for t in types}
    for parent, children in LABEL_HIERARCHY.items():
        if present & set(children):
            present.add(parent)
    if not (types - set(DEVICE_TYPES)):
        present.add("No Finding")
    return {name: POSITIVE if name in present else NEGATIVE for name in CHEXPERT_LABELS}


# ---------------------------------------------------------------------------- random streams


def _int_key(key: object) -> int:
    if isinstance(key, int | np.integer) and key >= 0:
        return int(key)
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")


def _rng(*keys: object) -> np.random.Generator:
    """An independent generator per named stream, e.g. _rng(seed, "study", 7)."""
    return np.random.default_rng(np.random.SeedSequence([_int_key(k) for k in keys]))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


def _pick(rng: np.random.Generator, options: Sequence[Any], p: Sequence[float] | None = None):
    if p is not None:
        p = np.asarray(p, dtype=float)
        p = p / p.sum()
    return options[int(rng.choice(len(options), p=p))]


# ---------------------------------------------------------------------------- sampling


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


# ============================================================================ rendering
# Densities are in "soft-tissue thickness" units: 1 ~ the mid-chest soft-tissue column.
# The lungs subtract air from it, bones and metal add to it; `_detector` turns the result
# into a processed radiograph.

_LUNG_AX, _LUNG_CY, _LUNG_BY = 0.78, 0.35, 1.25  # rib-cage inner ellipse
_DOME_R, _DOME_L = 0.40, 0.46  # hemidiaphragm dome tops (right higher)
_HILUM = {"right": (0.165, -0.03), "left": (0.175, -0.08)}  # (lateral x, v)
_AIR = 0.7  # fraction of the tissue column a full-depth lung replaces with air


def _lung_half_width(v):
    t = (np.asarray(v, dtype=float) - _LUNG_CY) / _LUNG_BY
    return _LUNG_AX * np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


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


# ---------------------------------------------------------------------------- frontal view


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


def _work_size(size: int) -> int:
    """Resolution of the smooth fields (body, lungs, heart, opacities): half the output
    from 256 px up, upsampled after; lines, bones and devices are drawn at full size."""
    return size // 2 if size >= 256 else size


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    img = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))
    return np.array(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


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


# ---------------------------------------------------------------------------- lateral view


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


# ============================================================================ reports


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, slots: dict[str, str]) -> str:
    """Fill {slot} and {Slot} (capitalised) placeholders."""
    def rep(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in slots:
            return slots[name]
        low = name[:1].lower() + name[1:]
        if low in slots:
            return _cap(slots[low])
        raise KeyError(f"template {template!r} needs slot {name!r}")

    return re.sub(r"\{(\w+)\}", rep, template)


def _variants(f: Finding) -> list[str]:
    """Template variant keys that apply to a finding (FINDING_ / IMPRESSION_TEMPLATES)."""
    t = f.type
    if t == "pleural_effusion":
        if f.side == "bilateral":
            return ["bilateral"]
        return ["unilateral"] + ([f"unilateral_{f.grade}"] if f.grade in ("small", "large")
                                 else [])
    if t == "pneumothorax":
        if f.params.get("tension"):
            return ["tension"]
        return ["any"] + (["small"] if f.grade == "small" else [])
    if t == "atelectasis":
        return [f"{'bilateral' if f.side == 'bilateral' else 'unilateral'}_{f.grade}"]
    if t == "edema":
        return [f.grade]
    if t == "pleural_other":
        if f.grade == "plaques":
            return ["plaques_bilateral" if f.side == "bilateral" else "plaques_unilateral"]
        if f.side == "bilateral":
            return ["thickening_bilateral"]
        return [f"thickening_{f.location or 'apical'}"]
    if t == "fracture":
        return [f.grade]
    if t == "endotracheal_tube":
        return ["any", f.grade]
    if t == "enteric_tube":
        return [f.grade]
    if t == "central_line":
        return [f.params.get("access", "internal_jugular")]
    if t == "pacemaker":
        return [f"{f.grade}_{f.params.get('leads', 2)}"]
    return ["any"]


def _slots(f: Finding, rng: np.random.Generator) -> dict[str, str]:
    slots: dict[str, str] = {}
    if f.side in ("left", "right"):
        slots["side"] = f.side
        slots["contra"] = "leftward" if f.side == "right" else "rightward"
    for slot, options in GRADE_WORDS.get(f.type, {}).get(f.grade or "", {}).items():
        slots[slot] = _pick(rng, options)
    if f.type in ("consolidation", "pneumonia") and f.location in LOBES:
        slots["lobe"], slots["lobe_adj"] = LOBES[f.location][1:]
    if f.type in ("nodule", "mass"):
        slots["zone"] = f.location or "mid"
        slots["mm"] = str(int(round(f.size_mm or 10)))
        slots["cm"] = str(max(3, int(round((f.size_mm or 30) / 10))))
    if f.type == "fracture":
        slots["rib"] = _pick(rng, RIB_ORDINALS[int(f.params.get("rib", 6))])
    if f.type == "endotracheal_tube":
        slots["cm"] = str(int(f.params.get("tip_cm", 4)))
    if f.type == "enteric_tube":
        slots["kind"] = f.params.get("kind", "enteric")
    if f.type in ("central_line", "picc"):
        slots["tip"] = _pick(rng, TIP_WORDS[f.grade or "cavoatrial"])
    return slots


def _sentence(f: Finding, table: dict[str, dict[str, tuple[str, ...]]],
              rng: np.random.Generator) -> str | None:
    variants = table.get(f.type, {})
    pool = [t for key in _variants(f) for t in variants.get(key, ())]
    if not pool:
        return None
    return _fill(_pick(rng, pool), _slots(f, rng))


def _exam_key(views: Sequence[str]) -> str:
    frontal = next((v for v in views if v in ("PA", "AP")), None)
    lateral = any(v in ("LATERAL", "LL") for v in views)
    if frontal is None:
        return "lat"
    return f"{frontal.lower()}_lat" if lateral else frontal.lower()


def report_sentences(spec: StudySpec, rng: np.random.Generator | None = None
                     ) -> dict[str, list[str]]:
    """The sentences of a study's report by section: {"FINDINGS", "IMPRESSION", "ADDENDUM"}.

    Reporting by exception: every finding present is stated (with side, size, location),
    absent ones only ever in negative statements. FINDINGS is empty in a few reports (as in
    MIMIC); the IMPRESSION then names the devices too.
    """
    rng = rng or _rng(spec.seed, "report", spec.index)
    types = {f.type for f in spec.findings}
    devices = [f for f in spec.findings if FINDING_TYPES[f.type].device]
    pathology = [f for f in spec.findings if not FINDING_TYPES[f.type].device]
    exam = _exam_key(spec.views)

    def maybe_neg(concept: str, p: float) -> list[str]:
        templates, forbidden = NEGATIVE_TEMPLATES[concept]
        if types & forbidden or rng.random() >= p:
            return []
        return [_pick(rng, templates)]

    findings: list[str] = []
    if rng.random() < 0.35:
        findings.append(_pick(rng, FRAMING_TEMPLATES[exam]))
    device_lines = [s for f in devices if (s := _sentence(f, FINDING_TEMPLATES, rng))]
    lungs = [s for f in pathology if f.type in LUNG_OPACITY_TYPES
             if (s := _sentence(f, FINDING_TEMPLATES, rng))]
    if spec.anatomy.inspiration < 0.88 and exam != "lat" and rng.random() < 0.6:
        lungs.insert(0, _pick(rng, EXTRA_TEMPLATES["low_volumes"]))
    if (e := spec.get("edema")) is not None and e.grade != "mild" and rng.random() < 0.4:
        lungs.append(_pick(rng, EXTRA_TEMPLATES["kerley"]))
    if not types & LUNG_FINDINGS:
        if rng.random() < 0.85:
            lungs.append(_pick(rng, NORMAL_LUNG_TEMPLATES["clear"]))
    elif not types & {"edema", "pleural_effusion"} and rng.random() < 0.5:
        lungs.append(_pick(rng, NORMAL_LUNG_TEMPLATES["otherwise_clear"]))
    lungs += maybe_neg("consolidation", 0.25 if types & LUNG_FINDINGS else 0.15)
    lungs += maybe_neg("edema", 0.2)
    pleura = [s for f in pathology if f.type in ("pleural_effusion", "pneumothorax",
                                                 "pleural_other")
              if (s := _sentence(f, FINDING_TEMPLATES, rng))]
    if not types & {"pleural_effusion", "pneumothorax"} and rng.random() < 0.7:
        pleura += maybe_neg("effusion_pneumothorax", 1.0)
    else:
        pleura += maybe_neg("effusion", 0.4) + maybe_neg("pneumothorax", 0.6)
    heart = [s for f in pathology if f.type in ("cardiomegaly", "enlarged_cardiomediastinum")
             if (s := _sentence(f, FINDING_TEMPLATES, rng))]
    if rng.random() < 0.5:
        heart += maybe_neg("cardiomediastinal", 0.8)
    else:
        heart += maybe_neg("heart", 0.75) + maybe_neg("mediastinum", 0.3)
    bones = [s for f in pathology if f.type == "fracture"
             if (s := _sentence(f, FINDING_TEMPLATES, rng))]
    bones += maybe_neg("bones", 0.35)
    if rng.random() < 0.7:
        findings += device_lines + lungs + pleura + heart + bones
    else:
        findings += lungs + pleura + heart + bones + device_lines

    impression: list[str] = []
    for f in pathology:
        table = IMPRESSION_TEMPLATES if rng.random() < 0.6 else FINDING_TEMPLATES
        if (s := _sentence(f, table, rng)) is not None:
            impression.append(s)
    for f in devices:  # malpositioned devices make the impression
        if f.grade in ("low", "high", "esophagus") and (
                s := _sentence(f, IMPRESSION_TEMPLATES, rng)):
            impression.append(s)
    if not pathology:
        key = "normal" if not devices and rng.random() < 0.2 else "no_acute"
        impression.insert(0, _pick(rng, IMPRESSION_NORMAL_TEMPLATES[key]))
        if devices and rng.random() < 0.3:
            impression.append(_pick(rng, IMPRESSION_NORMAL_TEMPLATES["devices"]))
    addendum = [_pick(rng, ADDENDUM_TEMPLATES)] if pathology and rng.random() < 0.06 else []
    if rng.random() < 0.04:  # impression-only report
        findings = []
        impression += [s for s in device_lines if s not in impression]
    return {"FINDINGS": findings, "IMPRESSION": impression, "ADDENDUM": addendum}


def write_report(spec: StudySpec) -> str:
    """The study's free-text report, formatted like MIMIC-CXR's (78-column wrapped sections).

    FINDINGS and IMPRESSION sentences come from the template tables; a few reports have no
    FINDINGS section (as in MIMIC), a few an ADDENDUM. Nothing absent is stated as present.
    """
    rng = _rng(spec.seed, "report", spec.index)
    sections = report_sentences(spec, rng)
    exam = _exam_key(spec.views)
    sexword = "man" if spec.sex == "M" else "woman"
    if spec.setting == "icu":
        reason_key = "icu"
    elif spec.has("fracture") and rng.random() < 0.6:
        reason_key = "trauma"
    elif (spec.has("pacemaker") or spec.has("sternotomy")) and rng.random() < 0.5:
        reason_key = "cardiac"
    else:
        reason_key = "general"
    indication = _fill(_pick(rng, INDICATION_TEMPLATES), {
        "man": sexword, "sex": spec.sex,
        "reason": _pick(rng, INDICATION_REASONS[reason_key])})
    comparison = _pick(rng, COMPARISON_TEMPLATES["first" if spec.first_study and rng.random()
                                                  < 0.7 else "prior"])

    def section(title: str, sentences: Sequence[str], inline: bool = False) -> list[str]:
        text = "  ".join(sentences)
        if inline:
            lines = textwrap.wrap(f"{title}:  {text}", width=78, initial_indent=" ",
                                  subsequent_indent=" ", break_on_hyphens=False)
            return lines + [" "]
        body = textwrap.wrap(text, width=78, initial_indent=" ", subsequent_indent=" ",
                             break_on_hyphens=False)
        return [f" {title}: ", " "] + body + [" "]

    lines = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {EXAMINATION_TEXT[exam]}", " "]
    lines += section("INDICATION", [indication], inline=True)
    lines += section("TECHNIQUE", [_pick(rng, TECHNIQUE_TEMPLATES[exam])], inline=True)
    lines += section("COMPARISON", [comparison], inline=True)
    for title in ("FINDINGS", "IMPRESSION", "ADDENDUM"):
        if sections[title]:
            lines += section(title, sections[title])
    return "\n".join(lines).rstrip() + "\n"


# ============================================================================ DICOM encoding

# (short name, weight): lossless syntaxes dominate, as in a research export.
# (pydicom's RLE encoder is slow, ~0.1 s per 512 px image: rarer than in real archives.)
TRANSFER_SYNTAX_WEIGHTS: dict[str, float] = {
    "explicit_le": 0.32, "implicit_le": 0.14, "explicit_be": 0.03, "deflated": 0.1,
    "rle": 0.03, "jpeg_ls": 0.22, "jpeg2000_lossless": 0.12, "jpeg2000": 0.04,
}
BITS_STORED_WEIGHTS: dict[int, float] = {12: 0.55, 16: 0.2, 14: 0.12, 10: 0.1, 8: 0.03}

_SYLLABLES = ("var", "lo", "me", "net", "ka", "ri", "dos", "tel", "an", "mo", "su", "bel",
              "quin", "ra", "vo", "li", "den", "sa", "tor", "ve", "mi", "nor", "ga", "phe")
_INSTITUTIONS = ("Saint Varlo Hospital", "Menet General", "Ravenoak Medical Center",
                 "Quindel University Hospital")


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


def encode_view(pixels: np.ndarray, spec: StudySpec, subject: Subject, view: str,
                view_index: int, dicom_id: str) -> tuple[bytes, dict[str, Any]]:
    """Encode one rendered view as DICOM with a drawn syntax / photometric / bit depth.

    Returns the bytes and the encoding facts (for metadata.csv and the summary).
    """
    rng = _rng(spec.seed, "dicom", spec.index, view_index)
    study_rng = _rng(spec.seed, "header", spec.index)  # shared by the study's images
    names = [n for n in TRANSFER_SYNTAX_WEIGHTS if n in TRANSFER_SYNTAXES]
    ts = _pick(rng, names, [TRANSFER_SYNTAX_WEIGHTS[n] for n in names])
    bits = int(_pick(rng, list(BITS_STORED_WEIGHTS), list(BITS_STORED_WEIGHTS.values())))
    modality = "CR" if rng.random() < (0.5 if view == "AP" else 0.25) else "DX"
    photometric = "MONOCHROME1" if rng.random() < (0.45 if modality == "CR" else 0.15) else \
        "MONOCHROME2"
    maxval = 2**bits - 1
    lo = _u(rng, 0.0, 0.08) * maxval
    hi = _u(rng, 0.85, 1.0) * maxval
    values = np.rint(lo + pixels.astype(np.float64) * (hi - lo))
    if photometric == "MONOCHROME1":
        values = maxval - values
    values = values.astype(np.uint8 if bits <= 8 else np.uint16)
    rows, cols = values.shape
    if rng.random() < 0.15:  # some detectors are not square: crop columns
        cols = int(cols * _u(rng, 0.8, 0.95)) // 2 * 2
        off = (values.shape[1] - cols) // 2
        values = np.ascontiguousarray(values[:, off:off + cols])
    attrs: dict[str, Any] = {
        "PatientName": subject.name,
        "PatientID": subject.patient_id,
        "PatientBirthDate": subject.birth_date,
        "PatientSex": spec.sex,
        "PatientAge": f"{spec.age:03d}Y",
        "StudyInstanceUID": make_uid("echo-ray-synth", spec.seed, "study", spec.study_id),
        "SeriesInstanceUID": make_uid("echo-ray-synth", spec.seed, "series", spec.study_id,
                                      view_index),
        "SOPInstanceUID": make_uid("echo-ray-synth", spec.seed, "sop", dicom_id),
        "StudyDate": spec.study_date,
        "SeriesDate": spec.study_date,
        "StudyTime": spec.study_time,
        "AccessionNumber": f"{int(study_rng.integers(10**7, 10**8))}",
        "StudyID": str(spec.study_id),
        "SeriesNumber": view_index + 1,
        "InstanceNumber": 1,
        "Modality": modality,
        "ViewPosition": view,
        "StudyDescription": EXAMINATION_TEXT[_exam_key(spec.views)],
        "SeriesDescription": {"PA": "CHEST PA", "AP": "CHEST AP PORTABLE", "LATERAL": "CHEST LAT",
                              "LL": "CHEST LAT"}[view],
        "InstitutionName": _pick(study_rng, _INSTITUTIONS),
        "ReferringPhysicianName": fake_name(study_rng),
        "Manufacturer": _pick(study_rng, ("Phantom Imaging", "Synthex", "Varlo Medical")),
        "PixelSpacing": [round(380.0 / rows, 4), round(380.0 / rows, 4)],
        "PatientOrientation": ["L", "F"] if view in ("PA", "AP") else ["A", "F"],
    }
    if rng.random() < 0.5:  # a window covering the data, as modalities write
        span = float(values.max()) - float(values.min())
        attrs["WindowCenter"] = round(float(values.min()) + span * _u(rng, 0.45, 0.55), 1)
        attrs["WindowWidth"] = round(span * _u(rng, 1.0, 1.15) + 1, 1)
    if rng.random() < 0.3:
        intercept = _pick(rng, (0.0, -1024.0, -512.0))
        attrs["RescaleSlope"] = 1.0
        attrs["RescaleIntercept"] = intercept
        attrs["RescaleType"] = "US"
        if "WindowCenter" in attrs:
            attrs["WindowCenter"] = round(attrs["WindowCenter"] + intercept, 1)
    data = write_dicom(values, transfer_syntax=ts, photometric=photometric, bits_stored=bits,
                       attrs=attrs)
    facts = {"TransferSyntax": ts, "PhotometricInterpretation": photometric,
             "BitsStored": bits, "Modality": modality, "Rows": rows, "Columns": cols}
    return data, facts


# ============================================================================ the archive

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning", "Modality",
                    "PhotometricInterpretation", "BitsStored", "TransferSyntax")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
SPLITS = ("train", "validate", "test")
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
              "LL": "left lateral"}


def dicom_id_for(seed: int, study_id: int, view_index: int) -> str:
    """MIMIC-style dicom_id: 40 hex digits in five groups of eight."""
    h = hashlib.sha1(f"echo-ray-synth/{seed}/{study_id}/{view_index}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def study_dir(subject_id: int, study_id: int) -> Path:
    """files/pXX/pSUBJECT/sSTUDY (relative to the archive root)."""
    return Path("files") / f"p{str(subject_id)[:2]}" / f"p{subject_id}" / f"s{study_id}"


@dataclass(frozen=True)
class _Task:
    spec: StudySpec
    subject: Subject
    out_dir: str
    image_size: int


SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / validate / test, by subject


def _permute(i: int, n: int, seed: int) -> int:
    """A seeded bijection of range(n) (n <= 2**24): a 4-round Feistel network on 24 bits,
    cycle-walking until the value falls inside the range."""
    keys = [_int_key(f"feistel/{seed}/{r}") & 0xFFF for r in range(4)]
    x = i
    while True:
        left, right = x >> 12, x & 0xFFF
        for k in keys:
            left, right = right, left ^ (((right * 2654435761) ^ k) >> 7 & 0xFFF)
        x = (left << 12) | right
        if x < n:
            return x


def plan_archive(num_studies: int, *, seed: int = 0, lateral_fraction: float = 0.3,
                 lateral_only_fraction: float = 0.0, normal_fraction: float = 0.35
                 ) -> list[tuple[StudySpec, Subject, str]]:
    """Subjects (1-3 studies each), study specs and each subject's split; no pixels.

    Prefix-stable: a larger archive with the same seed and options starts with the same
    subjects and studies (ids, findings, splits) - only the last subject's study count and
    the small-archive split guarantee below can differ. Splits are by subject, ~80/10/10;
    from 3 subjects up, validate and test each get at least one.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    rng = _rng(seed, "plan")
    counts: list[int] = []
    while sum(counts) < num_studies:
        counts.append(int(_pick(rng, (1, 2, 3), (0.45, 0.35, 0.2))))
    counts[-1] -= sum(counts) - num_studies
    n_sub = len(counts)
    # subject ids increase with random gaps; study ids permute the index: both unique
    subject_ids = 10_000_000 + np.cumsum(
        [int(_rng(seed, "subject-id", i).integers(1, 90)) for i in range(n_sub)])
    study_ids = [50_000_000 + _permute(k, 10**7, seed) for k in range(num_studies)]
    draws = [float(_rng(seed, "split", i).random()) for i in range(n_sub)]
    cuts = np.cumsum(SPLIT_FRACTIONS)
    split_of = {i: SPLITS[int(np.searchsorted(cuts, u, side="right"))] for i, u in
                enumerate(draws)}
    if n_sub >= 3:  # small archives: move the highest-drawn train subjects to empty splits
        for name in ("test", "validate"):
            if name not in split_of.values():
                train = [i for i in range(n_sub) if split_of[i] == "train"]
                split_of[max(train, key=lambda i: draws[i])] = name
    plan = []
    k = 0
    for i, n in enumerate(counts):
        subject = _sample_subject(seed, i, int(subject_ids[i]))
        day = subject.first_date
        srng = _rng(seed, "subject-dates", i)
        for j in range(n):
            age = subject.base_age + (day - subject.first_date) // 365
            spec = sample_study(seed, k, subject_id=subject.subject_id,
                                study_id=int(study_ids[k]), sex=subject.sex, age=int(age),
                                lateral_fraction=lateral_fraction,
                                lateral_only_fraction=lateral_only_fraction,
                                normal_fraction=normal_fraction, study_date=_date(day),
                                first_study=j == 0)
            plan.append((spec, subject, split_of[i]))
            day += int(srng.integers(1, 700))
            k += 1
    return plan


def _write_study(task: _Task) -> dict[str, Any]:
    """Render, encode and write one study; return its csv rows and ground truth."""
    spec, subject, root = task.spec, task.subject, Path(task.out_dir)
    sdir = study_dir(spec.subject_id, spec.study_id)
    (root / sdir).mkdir(parents=True, exist_ok=True)
    images = []
    render_s = encode_s = 0.0
    for vi, view in enumerate(spec.views):
        dicom_id = dicom_id_for(spec.seed, spec.study_id, vi)
        t0 = time.perf_counter()
        pixels = render_view(spec, view, task.image_size)
        t1 = time.perf_counter()
        data, facts = encode_view(pixels, spec, subject, view, vi, dicom_id)
        t2 = time.perf_counter()
        render_s += t1 - t0
        encode_s += t2 - t1
        (root / sdir / f"{dicom_id}.dcm").write_bytes(data)
        images.append({"dicom_id": dicom_id, "view": view, **facts})
    (root / sdir.parent / f"{sdir.name}.txt").write_text(write_report(spec))
    return {"images": images, "render_s": render_s, "encode_s": encode_s}


_ARCHIVE_FILES = ("metadata.csv", "split.csv", "chexpert.csv", "ground_truth.jsonl",
                  "synth_config.json")


def _prepare_out_dir(root: Path) -> None:
    """Create `root`, or empty it of a previous synthetic archive (so no stale study is left
    behind); refuse a non-empty directory that holds anything else."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"out_dir {root} is a file; give a directory for the archive")
    if root.is_dir() and any(root.iterdir()):
        if not (root / "synth_config.json").is_file():
            raise ValueError(f"out_dir {root} is not empty and holds no synth_config.json: it "
                             "is not a synthetic archive, so nothing in it is replaced; choose "
                             "a new or empty directory")
        shutil.rmtree(root / "files", ignore_errors=True)
        for name in _ARCHIVE_FILES:
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def synthesize_archive(out_dir: str | Path, *, num_studies: int, seed: int = 0,
                       image_size: int = 512, lateral_fraction: float = 0.3,
                       lateral_only_fraction: float = 0.0, normal_fraction: float = 0.35,
                       workers: int = 1) -> dict[str, Any]:
    """Write a synthetic MIMIC-CXR-layout archive and return a summary.

    Same arguments -> byte-identical files. Studies draw from their own random streams, so
    `workers` > 1 (processes) gives the same bytes as 1.

    Args:
        out_dir: archive root: created, or empty, or a previous synthetic archive (which is
            replaced whole); a directory holding anything else is refused.
        num_studies: number of studies (subjects have 1-3 each).
        seed: the archive's seed.
        image_size: rendered side in pixels (some detectors are then cropped non-square).
        lateral_fraction: probability that a study has a lateral view beside the frontal.
        lateral_only_fraction: probability that a study has only a lateral view.
        normal_fraction: probability that a study has no pathology (devices may remain).
        workers: processes rendering studies in parallel.

    Returns:
        {"num_subjects", "num_studies", "num_images", "views", "findings", "labels",
        "splits", "transfer_syntaxes", "photometric", "bits_stored", "modalities",
        "seconds", "ms_per_image_render", "ms_per_image_encode"} (counts are dicts).
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for name, value in (("lateral_fraction", lateral_fraction),
                        ("lateral_only_fraction", lateral_only_fraction),
                        ("normal_fraction", normal_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    t_start = time.perf_counter()
    root = Path(out_dir)
    _prepare_out_dir(root)
    plan = plan_archive(num_studies, seed=seed, lateral_fraction=lateral_fraction,
                        lateral_only_fraction=lateral_only_fraction,
                        normal_fraction=normal_fraction)
    tasks = [_Task(spec, subject, str(root), image_size) for spec, subject, _ in plan]
    if workers > 1:
        # spawn: forking a process that holds threads (torch, Ray) can deadlock
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_write_study, tasks, chunksize=4))
    else:
        results = [_write_study(t) for t in tasks]

    meta_rows, split_rows, chex_rows, gt_lines = [], [], [], []
    summary: dict[str, Counter] = {k: Counter() for k in (
        "views", "findings", "labels", "splits", "transfer_syntaxes", "photometric",
        "bits_stored", "modalities")}
    render_s = encode_s = 0.0
    for (spec, subject, split), res in zip(plan, results, strict=True):
        render_s += res["render_s"]
        encode_s += res["encode_s"]
        labels = chexpert_labels(spec.findings)
        for img in res["images"]:
            view = img["view"]
            meta_rows.append({
                "dicom_id": img["dicom_id"], "subject_id": spec.subject_id,
                "study_id": spec.study_id,
                "PerformedProcedureStepDescription": EXAMINATION_TEXT[_exam_key(spec.views)],
                "ViewPosition": view, "Rows": img["Rows"], "Columns": img["Columns"],
                "StudyDate": spec.study_date, "StudyTime": spec.study_time,
                "ProcedureCodeSequence_CodeMeaning": EXAMINATION_TEXT[_exam_key(spec.views)],
                "ViewCodeSequence_CodeMeaning": _VIEW_CODE[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect" if view != "AP" else
                "Semi-erect",
                "Modality": img["Modality"],
                "PhotometricInterpretation": img["PhotometricInterpretation"],
                "BitsStored": img["BitsStored"], "TransferSyntax": img["TransferSyntax"],
            })
            split_rows.append({"dicom_id": img["dicom_id"], "study_id": spec.study_id,
                               "subject_id": spec.subject_id, "split": split})
            summary["views"][view] += 1
            summary["transfer_syntaxes"][img["TransferSyntax"]] += 1
            summary["photometric"][img["PhotometricInterpretation"]] += 1
            summary["bits_stored"][img["BitsStored"]] += 1
            summary["modalities"][img["Modality"]] += 1
        chex_rows.append({"subject_id": spec.subject_id, "study_id": spec.study_id,
                          **labels})
        gt_lines.append(json.dumps({
            "subject_id": spec.subject_id, "study_id": spec.study_id, "split": split,
            "report": str(study_dir(spec.subject_id, spec.study_id)) + ".txt",
            "views": [{"dicom_id": i["dicom_id"], "view": i["view"]} for i in res["images"]],
            "sex": spec.sex, "setting": spec.setting,
            "anatomy": {k: _round(v) for k, v in dataclasses.asdict(spec.anatomy).items()},
            "findings": [f.to_dict() for f in spec.findings],
            "labels": labels,
        }, sort_keys=True))
        summary["splits"][split] += 1
        for f in spec.findings:
            summary["findings"][f.type] += 1
        for name, value in labels.items():
            summary["labels"][name] += int(value == POSITIVE)

    def write_csv(name: str, columns: Sequence[str], rows: list[dict]) -> None:
        with open(root / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)

    write_csv("metadata.csv", METADATA_COLUMNS, meta_rows)
    write_csv("split.csv", SPLIT_COLUMNS, split_rows)
    write_csv("chexpert.csv", CHEXPERT_COLUMNS, chex_rows)
    (root / "ground_truth.jsonl").write_text("\n".join(gt_lines) + "\n")
    config = {"generator": "echo_ray.synth", "num_studies": num_studies, "seed": seed,
              "image_size": image_size, "lateral_fraction": lateral_fraction,
              "lateral_only_fraction": lateral_only_fraction,
              "normal_fraction": normal_fraction}
    (root / "synth_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n_images = len(meta_rows)
    out: dict[str, Any] = {
        "num_subjects": len({s.subject_id for s, _, _ in plan}),
        "num_studies": len(plan),
        "num_images": n_images,
        **{k: dict(sorted(c.items())) for k, c in summary.items()},
        "seconds": round(time.perf_counter() - t_start, 3),
        "ms_per_image_render": round(1000 * render_s / max(1, n_images), 2),
        "ms_per_image_encode": round(1000 * encode_s / max(1, n_images), 2),
    }
    return out
