"""The labeler's phrase tables, laid out as the CheXpert labeler's: per observation, the
mention phrases (asserted, or uncertain even when asserted) and the unmention phrases that
veto a mention they overlap; findings outside the 14 labels by region (CheXpert's
no_finding list); and the region under which a normalized report files each observation.
"""

from __future__ import annotations

import re

from echo_ray.text.labels import POSITIVE, UNCERTAIN

# Mentions are regular expressions over the prepared sentence (labeler.prepare_sentence:
# lowercased, "s/p" / "w/" / "c/w" spelled out, de-identification marks made one token),
# built from the CheXpert labeler's phrases/mention/<observation>.txt with the synonyms,
# morphology and abbreviations radiologists use (ETT, NGT, PICC, ICD, CHF, PTX, PNA, atx,
# ...). Deliberate departures: CheXpert's heart / mediastinum phrases ("the heart",
# "heart size", "contour") are read as size statements by the labeler, not as mentions;
# "fibrosis" is Lung Opacity (pleural fibrosis stays Pleural Other); "marker" (skin and
# nipple markers) is no device, sternotomy wires are. A mention that overlaps one of its
# observation's unmention phrases (phrases/unmention/*.txt: "pericardial effusion" is not
# a pleural effusion, a "calcified nodule" not a lung lesion) is dropped. OTHER marks
# findings outside the 13 observations (CheXpert's no_finding.txt list: emphysema,
# granuloma, hernia, scoliosis, ...), which only block "No Finding".

OTHER = "Other"

# The region under which a normalized report files each observation.
OBSERVATION_REGION: dict[str, str] = {
    "Enlarged Cardiomediastinum": "mediastinum",
    "Cardiomegaly": "heart",
    "Lung Opacity": "lungs",
    "Lung Lesion": "lungs",
    "Edema": "vasculature",  # pulmonary edema travels with vascular congestion
    "Consolidation": "lungs",
    "Pneumonia": "lungs",
    "Atelectasis": "lungs",
    "Pneumothorax": "diaphragm",  # "diaphragm" covers the pleural spaces
    "Pleural Effusion": "diaphragm",
    "Pleural Other": "diaphragm",
    "Fracture": "bones",
    "Support Devices": "devices",
}

_MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"mediastinal (?:widening|enlargement|lymphadenopathy|adenopathy|mass(?:es)?)",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"cardiac enlargement",
        r"(?:left |right )?(?:bi)?(?:ventricular|atrial) (?:enlargement|dilatation)",
    ),
    "Lung Opacity": (
        r"opaci(?:ty|ties|fication|fications|fied)",
        r"ggos?",
        r"haz(?:y|iness)|decreased translucency",
        r"infiltrat\w*",
        r"air[- ]?space (?:disease|process|filling)",
        r"ground[- ]glass",
        r"(?:increased|patchy|hazy|streaky|linear|focal|ill-defined|parenchymal|retrocardiac"
        r"|basilar|bibasilar) densit(?:y|ies)",
        r"reticula(?:r|tion|ted)|reticulonodular",
        r"interstitial (?:markings?|opacit\w+|abnormalit\w+|prominence|pattern|lung disease"
        r"|thickening|changes|process|disease)|ild",
        r"scar(?:s|ring|red)?",
        r"fibro(?:sis|tic)",
        r"(?:peribronchial|bronchial wall) thickening",
    ),
    # "lesion" alone is too vague (CheXpert's choice).
    "Lung Lesion": (
        r"nodules?",
        r"nodular (?:opacit\w+|densit\w+|lesions?|foci|focus|consolidation)",
        r"mass(?:es)?|lump",
        r"tumou?rs?|neoplasms?|carcinomas?|malignanc(?:y|ies)|cancer",
        r"(?:lung|pulmonary|parenchymal|cavitary|cavitating|spiculated) lesions?",
    ),
    "Edema": (
        r"edema(?:tous)?",
        r"(?:fluid|volume) overload",
        r"kerley(?: [ab])?(?: lines?)?",
        r"septal lines",
        r"chf",
        r"(?:congestive )?heart failure",
    ),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (
        r"(?:broncho)?pneumoni(?:a|as|c|tis)|pna",
        r"infectio(?:n|ns|us)(?: process)?",
    ),
    "Atelectasis": (
        r"atelecta\w*|atx",
        r"collaps(?:e|ed|ing)",
        r"volume loss",
    ),
    "Pneumothorax": (r"(?:hydro|hemo)?pneumothora(?:x|ces)", r"ptx"),
    "Pleural Effusion": (
        r"effusions?",
        r"pleural fluid",
        r"(?:hydro|hemo|pyo)thorax|hydropneumothorax|empyema",
        r"fluid (?:in|within|along|tracking (?:into|along)) (?:the )?"
        r"(?:(?:right|left|minor|major|horizontal|oblique) )*fissures?",
        r"fissural fluid",
        r"(?:layering|loculated|subpulmonic) (?:pleural )?fluid",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|plaques?|calcifications?|scar\w*|fibrosis)",
        r"pleural[- ]?parenchymal (?:scar\w*|thickening|changes|opacit\w+)",
        r"pleuroparenchymal (?:scar\w*|thickening|changes|opacit\w+)",
        r"fibrothorax|pleuro-?pericardial scar\w*",
        r"apical (?:pleural )?(?:cap(?:s|ping)?|thickening|scar\w*)",
        r"thickening of the pleura",
    ),
    "Fracture": (r"fractur\w*", r"fx"),
    # Surgical clips are not support devices (CheXpert's list has no "clip" either);
    # sternotomy wires are (the synthetic archive files them as a device).
    "Support Devices": (
        r"tubes?",
        r"ett|ngt|ogt|njt|dobb?hoff|ppm|tlc|tracheostomy|trach|catheters?|picc|cvc|cvl|ij"
        r"|port-?a-?cath|portacath|mediport|swan[- ]?ganz|impella|iabp|lvad|ecmo|aicd|icd"
        r"|pacer|pacemakers?|defibrillators?|stents?|coils?|cannula[es]?|sheath|introducer"
        r"|drains?|pigtail|hardware|wires?|electrodes?|leads",
        r"(?:central|venous|arterial|midline|dialysis|hemodialysis|subclavian|jugular|femoral"
        r"|ij|picc|triple[- ]lumen|double[- ]lumen|port|access|infusion)(?:[- ][a-z]+){0,2}?"
        r"[- ]lines?",
        r"(?:pacing|pacer|pacemaker|ppm|icd|aicd|defibrillator|transvenous|epicardial|biventricular"
        r"|rv|ra|right ventricular|right atrial) (?:[a-z]+ )?lead",
        r"(?:median )?sternotomy(?: wires?)?|sternal (?:wires?|sutures?|closure)",
        r"valve (?:replacement|prosthesis)|prosthetic (?:[a-z]+ )?valves?"
        r"|(?:mechanical|bioprosthetic|replaced) (?:[a-z]+ )?valves?|tavr|tavi"
        r"|annuloplasty(?: ring)?|mitraclip|watchman|loop recorder|stimulator",
        r"(?:support|medical|monitoring|implanted|closure) (?:devices?|apparatus|equipment)"
        r"|devices?",
        r"plates?(?![- ]?like)|screws?|arthroplast\w*|(?:humeral|shoulder) prosthesis",
        r"(?:chest|power|infusion|venous access|implanted|right-sided|left-sided|subclavian"
        r"|chest wall) port",
    ),
}

# CheXpert reports these as uncertain even when asserted: congestion is not yet edema,
# a blunted costophrenic angle may be fluid or thickening.
_UNCERTAIN_MENTIONS: dict[str, tuple[str, ...]] = {
    "Edema": (
        r"(?:(?:pulmonary|vascular|venous|hilar|central|interstitial) ){0,2}"
        r"(?:congestion|engorgement)",
        r"cephalization",
        r"(?:pulmonary )?vascular (?:prominence|indistinctness|redistribution|plethora|blurring)",
        r"(?:indistinct(?:ness)?|prominen(?:t|ce))(?: of)?(?: the)? (?:pulmonary )?"
        r"(?:vessels|vasculature|vascular markings)",
        r"pulmonary venous (?:hypertension|distension)",
        r"engorged (?:pulmonary )?(?:vessels|vasculature)",
    ),
    "Pleural Effusion": (
        r"blunt(?:ing|ed)? (?:of )?(?:the )?(?:(?:right|left|bilateral|both|posterior|lateral) )*"
        r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i))",
        r"(?:costophrenic|cp) (?:angles?|sulc(?:us|i)) (?:(?:is|are|remains?|appears?|now|again"
        r"|mildly|slightly) )*blunt\w*",
        r"(?:costophrenic|cp) angle blunting",
    ),
}

# Unmention phrases (CheXpert's phrases/unmention/*.txt, extended): a mention of the
# observation that overlaps one of them is not a mention. Heart / mediastinum size
# statements need no positional unmentions ("leads in the heart"): the labeler reads them
# only with a size attribute.
_UNMENTIONS: dict[str, tuple[str, ...]] = {
    "Lung Opacity": (
        r"(?:nodular|pleuro-?parenchymal|pleural[- ]parenchymal) opaci\w+",
        r"(?:pleural|pleuro-?parenchymal|pleural[- ]parenchymal|apical) scar\w*",
    ),
    "Lung Lesion": (
        r"calcified nodul\w*|massive|massengale|mass effect",
        r"(?:mediastinal|breast|soft[- ]tissue|tissue|muscle|body|chest wall) mass(?:es)?",
    ),
    "Edema": (r"(?:soft[- ]tissue|tissue|subcutaneous|wall|facial) edema",),
    "Atelectasis": (r"(?:vertebral|body|compression|tracheal) collaps\w+",),
    "Pleural Effusion": (r"(?:pericardial|joint) effusions?",),
}

# Findings outside the 14 labels, by region: they block "No Finding" (as CheXpert's
# no_finding.txt does) and tell the normalizer where a sentence belongs.
_OTHER_FINDINGS: dict[str, tuple[str, ...]] = {
    "thorax": (
        r"subcutaneous (?:emphysema|air|gas|edema)|chest wall edema",
        r"soft[- ]tissue (?:swelling|emphysema|gas|air|edema|mass(?:es)?)",
        r"chest wall (?:mass|swelling|emphysema|deformity)",
        r"pectus (?:excavatum|carinatum)",
    ),
    "mediastinum": (
        r"pneumomediastinum",
        r"(?:tortuous|tortuosity of|unfold\w*(?: of)?|ectatic|ectasia of|dilatation of"
        r"|aneurysm\w*(?: of)?)(?: the)?(?: thoracic| descending| ascending)? aort\w+",
        r"aort\w+ (?:is |are |remains )?(?:mildly |moderately )?(?:tortuous|unfolded|ectatic"
        r"|dilated|calcified|aneurysmal)",
        r"(?:aortic|vascular|atherosclerotic) calcifications?|atheroscler\w+",
        r"tracheal deviation|deviation of the trachea|goiter",
    ),
    "lungs": (
        r"(?<!subcutaneous )(?<!tissue )(?<!wall )emphysema\w*",
        r"hyper(?:inflat|expan)\w*",
        r"copd|bull(?:a|ae|ous)|blebs?|bronchiectasis|aspiration",
        r"granulom\w*|calcified (?:nodul\w+|granulom\w+)",
        r"bronchi(?:tis|olitis)|airways? disease|bronchospasm|asthma",
        r"metasta\w+",
        r"contusions?|(?:pulmonary |parenchymal )?(?:hemorrhage|hematoma)",
        r"(?:pulmonary|pulmonary arterial|pulmonary artery) hypertension",
    ),
    "hila": (
        r"hil(?:ar|um|a) (?:enlargement|prominence|fullness|lymphadenopathy|adenopathy|masses)",
        r"(?:enlarged|prominent|full|bulky) hil(?:a|um|ar)",
        r"(?<!mediastinal )(?:lymphadenopathy|adenopathy)",
    ),
    "heart": (r"pericardial effusions?",),
    "diaphragm": (
        r"(?:(?:hiatal|hiatus|diaphragmatic|paraesophageal) )?hernia",
        r"elevat\w+(?: of)?(?: the)?(?: right| left)? (?:hemi)?diaphragm\w*",
        r"(?:hemi)?diaphragm\w* (?:is |are |remains )?(?:[a-z]+ )?elevat\w+",
        r"eventration|pneumoperitoneum",
        r"free (?:intraperitoneal |intra-abdominal |subdiaphragmatic )?air",
    ),
    "bones": (
        r"scoliosis|kyphosis|kyphotic|osteopeni\w+|osteoporo\w+|demineraliz\w+|osteophyt\w+"
        r"|spondylo\w+|arthropathy|arthritis|dislocat\w+",
        r"(?:degenerative|arthritic) (?:change|disease)s?",
        r"deformit(?:y|ies)",
        r"(?:lytic|sclerotic|blastic|bone|osseous) lesions?",
        r"osteodystroph\w+",
        r"bullet(?: fragments?)?|(?:radiopaque|metallic) foreign bod(?:y|ies)|foreign bod(?:y|ies)",
    ),
}


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{'|'.join(patterns)})\b")


UNMENTION_TABLE: dict[str, re.Pattern[str]] = {
    label: _compile(patterns) for label, patterns in _UNMENTIONS.items()
}


def _compile_mentions() -> tuple[tuple[str, tuple[str, ...], float, re.Pattern[str]], ...]:
    table = []
    for label, patterns in _MENTIONS.items():
        for p in patterns:
            table.append((label, (OBSERVATION_REGION[label],), POSITIVE, p))
    for label, patterns in _UNCERTAIN_MENTIONS.items():
        for p in patterns:
            table.append((label, (OBSERVATION_REGION[label],), UNCERTAIN, p))
    for region, patterns in _OTHER_FINDINGS.items():
        for p in patterns:
            table.append((OTHER, (region,), POSITIVE, p))
    return tuple(
        (label, regions, base, re.compile(rf"\b(?:{p})\b")) for label, regions, base, p in table
    )


MENTION_TABLE = _compile_mentions()
