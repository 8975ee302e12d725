"""The report grammar: every sentence a synthetic report can contain.

A sentence is one of these templates with its {slots} filled from SLOT_VALUES ({Slot} = the
value with a capital first letter). The tables are the grammar that `is_well_formed` and the
evaluation's well-formedness rate enumerate; `template_regex` gives one template's sentences.
"""

from __future__ import annotations

import re
from functools import lru_cache

from echo_ray.synth.findings import ENTERIC_KINDS, LOBES, RIB_ORDINALS, ZONES

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


def _cap(s: str) -> str:
    """`s` with a capital first letter: the {Slot} form of a slot value."""
    return s[:1].upper() + s[1:]


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
