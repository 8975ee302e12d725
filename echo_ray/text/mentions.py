"""The labeler's phrase tables: the expressions that name each CheXpert observation
(asserted, or uncertain even when asserted), findings outside the 14 labels by region, and
the region under which a normalized report files each observation.
"""

from __future__ import annotations

import re

from echo_ray.text.labels import POSITIVE, UNCERTAIN

# Mentions are regular expressions over the lowercased sentence, in the spirit of the
# CheXpert labeler's phrases/mention/*.txt, with its "unmention" phrases folded in as
# look-behinds ("pericardial effusion" is not a pleural effusion). Labels come from the
# 13 observations; OTHER marks findings outside them (CheXpert's no_finding.txt list:
# emphysema, granuloma, hernia, scoliosis, ...), which only block "No Finding".

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
        r"(?<!nodular )(?<!pleuroparenchymal )(?<!pleural-parenchymal )(?<!pleural parenchymal )"
        r"opaci(?:ty|ties|fication|fications|fied)",
        r"haz(?:y|iness)",
        r"infiltrat\w*",
        r"air[- ]?space (?:disease|process|filling)",
        r"ground[- ]glass",
        r"(?:increased|patchy|hazy|streaky|linear|focal|ill-defined|parenchymal|retrocardiac"
        r"|basilar|bibasilar) densit(?:y|ies)",
        r"reticula(?:r|tion|ted)|reticulonodular",
        r"interstitial (?:markings?|opacit\w+|abnormalit\w+|prominence|pattern|lung disease"
        r"|thickening|changes|process|disease)",
        # scarring is an opacity; pleural / apical scarring is "Pleural Other" (CheXpert)
        r"(?<!pleural )(?<!pleural-parenchymal )(?<!pleuroparenchymal )(?<!pleural parenchymal )"
        r"(?<!apical )scar(?:s|ring|red)?",
        r"fibro(?:sis|tic)",
        r"(?:peribronchial|bronchial wall) thickening",
    ),
    # "lesion" alone is too vague (CheXpert's choice); calcified nodules and granulomas
    # are old granulomatous disease, an "other" finding, as CheXpert's guidelines say.
    "Lung Lesion": (
        r"(?<!calcified )nodules?",
        r"(?<!calcified )nodular (?:opacit\w+|densit\w+|lesions?|foci|focus|consolidation)",
        r"(?<!mediastinal )(?<!breast )(?<!tissue )(?<!muscle )(?<!body )mass(?:es)?(?! effect)",
        r"tumou?rs?|neoplasms?|carcinomas?|malignanc(?:y|ies)|cancer",
        r"(?:lung|pulmonary|parenchymal|cavitary|cavitating|spiculated) lesions?",
    ),
    "Edema": (
        r"(?<!tissue )(?<!subcutaneous )(?<!wall )(?<!facial )edema(?:tous)?",
        r"(?:fluid|volume) overload",
        r"kerley(?: [ab])?(?: lines?)?",
        r"septal lines",
        r"chf",
        r"(?:congestive )?heart failure",
    ),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"(?:broncho)?pneumoni(?:a|as|c|tis)", r"infectio(?:n|ns|us)(?: process)?"),
    "Atelectasis": (
        r"atelecta\w*",
        r"(?<!vertebral )(?<!body )(?<!compression )(?<!tracheal )collaps(?:e|ed|ing)",
        r"volume loss",
    ),
    "Pneumothorax": (r"(?:hydro|hemo)?pneumothora(?:x|ces)", r"ptx"),
    "Pleural Effusion": (
        r"(?<!pericardial )(?<!joint )effusions?",
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
        r"fibrothorax",
        r"apical (?:pleural )?(?:cap(?:s|ping)?|thickening|scar\w*)",
        r"thickening of the pleura",
    ),
    "Fracture": (r"fractur\w*", r"fx"),
    # Surgical clips are not support devices (CheXpert's list has no "clip" either).
    "Support Devices": (
        r"tubes?",
        r"ett|ngt|ogt|dobb?hoff|tracheostomy|trach|catheters?|picc|cvc|cvl|ij"
        r"|port-?a-?cath|portacath|mediport|swan[- ]?ganz|impella|iabp|lvad|ecmo|aicd|icd"
        r"|pacer|pacemakers?|defibrillators?|stents?|coils?|cannula[es]?|sheath|introducer"
        r"|drains?|pigtail|hardware|wires?|electrodes?|leads",
        r"(?:central|venous|arterial|midline|dialysis|hemodialysis|subclavian|jugular|femoral"
        r"|ij|picc|triple[- ]lumen|double[- ]lumen|port|access|infusion)(?:[- ][a-z]+){0,2}?"
        r"[- ]lines?",
        r"(?:pacing|pacer|pacemaker|icd|aicd|defibrillator|transvenous|epicardial|biventricular"
        r"|rv|ra|right ventricular|right atrial) (?:[a-z]+ )?lead",
        r"(?:median )?sternotomy(?: wires?)?|sternal (?:wires?|sutures?|closure)",
        r"valve (?:replacement|prosthesis)|prosthetic (?:[a-z]+ )?valves?"
        r"|(?:mechanical|bioprosthetic|replaced) (?:[a-z]+ )?valves?|tavr|tavi"
        r"|annuloplasty(?: ring)?|mitraclip|watchman|loop recorder|stimulator",
        r"(?:support|medical|monitoring|implanted|closure) (?:devices?|apparatus)|devices?",
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

# Findings outside the 14 labels, by region: they block "No Finding" (as CheXpert's
# no_finding.txt does) and tell the normalizer where a sentence belongs.
_OTHER_FINDINGS: dict[str, tuple[str, ...]] = {
    "thorax": (
        r"subcutaneous (?:emphysema|air|gas)",
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
    ),
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
