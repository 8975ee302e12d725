"""Radiology report text: MIMIC-CXR section parsing, normalization, CheXpert-style labeling.

Plain Python (no ray, no torch): used by data preparation, synthesis, evaluation and serving.

- parse_sections / findings_text / split_sentences: MIMIC-CXR report structure
  (create_section_files.py's header rules; addenda kept apart; "___" left as text).
- label_report: a compact rule-based CheXpert labeler (phrase tables + NegEx-style
  negation / uncertainty cues with clause scopes, CheXpert's aggregation, hierarchy and
  No Finding rules). It is the project's clinical metric; its decisions are listed in
  its docstring.
- normalize_report: the ECHO normalization: every region of REGIONS stated positive or
  negative, in order, with paraphrase variety (NEGATIVE_STATEMENTS, POINTER_STATEMENTS,
  NORMAL_IMPRESSIONS are the whole added vocabulary), preserving the labels.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from echo_ray.text.labels import (
    CHEXPERT5_LABELS,
    CHEXPERT_LABELS,
    LABEL_HIERARCHY,
    NEGATIVE,
    POSITIVE,
    REGIONS,
    UNCERTAIN,
)

__all__ = [
    "CHEXPERT5_LABELS",
    "CHEXPERT_LABELS",
    "NEGATIVE",
    "NEGATIVE_STATEMENTS",
    "NORMAL_IMPRESSIONS",
    "OBSERVATION_REGION",
    "POINTER_STATEMENTS",
    "POSITIVE",
    "REGIONS",
    "REGION_KEYWORDS",
    "UNCERTAIN",
    "findings_text",
    "label_report",
    "labels_to_vector",
    "normalize_report",
    "parse_sections",
    "sentence_region",
    "sentence_regions",
    "split_sentences",
]

# --------------------------------------------------------------------------------------
# Section parsing (after MIMIC-CXR's create_section_files.py / section_parser.py)
# --------------------------------------------------------------------------------------

# Header spelling -> section key. None: a title, not a section ("FINAL REPORT").
# "conclusion" and "findings and impression" are impressions, as MIMIC-CXR normalizes them.
_SECTION_ALIASES: dict[str, str | None] = {
    "final report": None,
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "reason for study": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "technique": "technique",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "finding": "findings",
    "findings": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "notification": "notification",
    "notifications": "notification",
    "wet read": "wet_read",
    "wetread": "wet_read",
    "addendum": "addendum",
    "addenda": "addendum",
    "comment": "comment",
    "comments": "comment",
}
# Sections that describe the request or the paperwork, never the image.
_ADMIN_SECTIONS = frozenset(
    {
        "examination",
        "indication",
        "history",
        "technique",
        "comparison",
        "notification",
        "recommendations",
        "wet_read",
        "addendum",
    }
)
_KNOWN_HEADER = "|".join(
    re.escape(k).replace(r"\ ", r"\s+") for k in sorted(_SECTION_ALIASES, key=len, reverse=True)
)
_HEADER_RE = re.compile(rf"(?i)(?<![\w(])(?P<name>{_KNOWN_HEADER})[ \t]*(?P<colon>:)?")
# Any all-caps "SOMETHING:" at a line start is a header too (MIMIC's own rule), e.g.
# "CHEST, PA AND LATERAL:"; it is named by the substring rules below.
_CAPS_HEADER_RE = re.compile(r"(?m)^[ \t]*(?P<name>[A-Z][A-Z ,()/&-]{2,60}?)[ \t]*(?P<colon>:)")
_VIEW_WORDS = re.compile(r"chest|portable|pa and lat|ap and lat|frontal|two views|one view|views?")


def _section_key(name: str) -> str | None:
    name = re.sub(r"\s+", " ", name.strip().lower())
    if name in _SECTION_ALIASES:
        return _SECTION_ALIASES[name]
    for main in ("impression", "findings", "history", "comparison", "addendum", "indication"):
        if main in name:
            return main
    if _VIEW_WORDS.search(name):  # "CHEST, PA AND LATERAL:" introduces the findings
        return "findings"
    return re.sub(r"\W+", "_", name).strip("_") or None


def _headers(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, key) of every section header, in text order."""
    found: list[tuple[int, int, str | None]] = []
    for m in _HEADER_RE.finditer(text):
        name = m.group("name")
        line_start = text.rfind("\n", 0, m.start()) + 1
        at_line_start = not text[line_start : m.start()].strip()
        rest_of_line = text[m.end() : (text.find("\n", m.end()) + 1 or len(text) + 1) - 1]
        if m.group("colon"):
            # Inline headers must be capitalized: "... IMPRESSION: ..." is a header,
            # "... a history: ..." is prose.
            ok = at_line_start or name[0].isupper()
        else:
            # Without a colon only a capitalized header alone on its line counts.
            ok = at_line_start and not rest_of_line.strip() and name[0].isupper()
        if ok:
            found.append((m.start(), m.end(), _section_key(name)))
    for m in _CAPS_HEADER_RE.finditer(text):
        start = m.start("name")
        if not any(s <= start < e for s, e, _ in found):
            found.append((start, m.end(), _section_key(m.group("name"))))
    found.sort()
    kept: list[tuple[int, int, str | None]] = []
    for h in found:  # drop headers overlapping an earlier one
        if not kept or h[0] >= kept[-1][1]:
            kept.append(h)
    return kept


def _dedent(body: str) -> str:
    # MIMIC-CXR separates the wet read from the report with a line of underscores.
    lines = (line.strip() for line in body.strip().splitlines())
    return "\n".join(line for line in lines if not re.fullmatch(r"_{5,}", line)).strip()


def parse_sections(text: str) -> dict[str, str]:
    """Split a radiology report into its sections, keyed by lowercase section name.

    Headers are recognized in MIMIC-CXR style: a known name ("FINDINGS", "Impression",
    "REASON FOR EXAMINATION", "RECOMMENDATION(S)", "WET READ", ...) followed by a colon,
    at a line start (any case) or inline when capitalized ("FINDINGS: ... IMPRESSION: ..."),
    or a capitalized known name alone on its line without a colon ("ADDENDUM"); plus any
    all-caps "NAME:" at a line start. Names are normalized as MIMIC-CXR does: "conclusion"
    and "findings and impression" become "impression", "reason for exam" "indication",
    "clinical history" "history", "comparisons" "comparison", "wet read" "wet_read",
    "recommendation(s)" "recommendations"; "CHEST, PA AND LATERAL:"-style view headers
    become "findings"; other names are lowercased with "_" for non-word characters.

    "FINAL REPORT" is a title and is dropped. Text before the first header is "preamble";
    a text without any header is returned whole as "full_report". Every addendum is kept
    under "addendum" (never merged into the findings); a key seen twice (two addenda,
    two findings blocks) has its bodies joined by a blank line. Empty findings /
    impression sections are dropped (as in MIMIC-CXR). "___" placeholders are left in
    place: they are text, not structure.
    """
    headers = _headers(text)
    if not headers:
        body = _dedent(text)
        return {"full_report": body} if body else {}
    sections: dict[str, str] = {}

    def add(key: str, body: str) -> None:
        body = _dedent(body)
        if body:
            sections[key] = f"{sections[key]}\n\n{body}" if key in sections else body

    add("preamble", text[: headers[0][0]])
    for i, (_, end, key) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        add(key or "preamble", text[end:stop])
    return sections


def findings_text(text: str) -> str:
    """The findings of a report; else its impression; else the report without headers.

    The last fallback keeps the non-administrative text (preamble, unknown sections) when
    there is any, and otherwise every section body, joined by blank lines.
    """
    sections = parse_sections(text)
    for key in ("findings", "impression"):
        if key in sections:
            return sections[key]
    clinical = [v for k, v in sections.items() if k not in _ADMIN_SECTIONS]
    return "\n\n".join(clinical or list(sections.values()))


# --------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------

# A period after these is not a sentence end ("Dr. ___", "vs. pneumonia", initials).
_ABBREVIATIONS = re.compile(
    r"(?i)(?:\b(?:dr|drs|mr|mrs|ms|vs|approx|appt|fig|pt|pts|st|ref)|\be\.g|\bi\.e"
    r"|(?<![\w.])[a-z])\.$"
)
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\n(?=\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s)")
_SENTENCE_END = re.compile(r"[.!?](?=\s+)|\s(?=\(?\d{1,2}\)\s)")


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Rules: blank lines and line-initial list markers ("1.", "2)", "-") end a sentence;
    single newlines are line wrapping and become spaces; ".", "!" and "?" followed by
    whitespace end a sentence unless they close an abbreviation ("Dr. ___", "vs.", "e.g.",
    a single initial); a decimal ("1.5 cm") never splits since no space follows its point.
    List markers are removed from the sentences and pieces without a letter (a lone "2."
    or "___.") are dropped; "___" inside a sentence is kept as text. Sentences keep their
    own punctuation.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text.replace("\r", "")):
        paragraph = re.sub(r"\s+", " ", paragraph).strip()
        start = 0
        for m in _SENTENCE_END.finditer(paragraph):
            piece = paragraph[start : m.end()]
            if piece.strip() and _ABBREVIATIONS.search(piece.rstrip()):
                continue
            sentences.append(piece)
            start = m.end()
        sentences.append(paragraph[start:])
    out = []
    for s in sentences:
        s = _LIST_MARKER.sub("", s.strip()).strip()
        if re.search(r"[A-Za-z]", s):
            out.append(s)
    return out


# --------------------------------------------------------------------------------------
# CheXpert-style labeler: phrase tables
# --------------------------------------------------------------------------------------
#
# Mentions are regular expressions over the lowercased sentence, in the spirit of the
# CheXpert labeler's phrases/mention/*.txt, with its "unmention" phrases folded in as
# look-behinds ("pericardial effusion" is not a pleural effusion). Labels come from the
# 13 observations; _OTHER marks findings outside them (CheXpert's no_finding.txt list:
# emphysema, granuloma, hernia, scoliosis, ...), which only block "No Finding".

_OTHER = "Other"

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
            table.append((_OTHER, (region,), POSITIVE, p))
    return tuple(
        (label, regions, base, re.compile(rf"\b(?:{p})\b")) for label, regions, base, p in table
    )


_MENTION_TABLE = _compile_mentions()

# Size statements about the heart and mediastinum ("heart size is normal", "the
# cardiac silhouette is mildly enlarged", "widened mediastinum") are subjects whose
# label comes from the attribute said of them (see _attribute_value).
_HEART_SUBJECT = re.compile(
    r"\b(?:(?:the )?size of the (?:heart|cardiac silhouette)"
    r"|heart(?! (?:failure|border|valve|rate|disease))(?: size)?"
    r"|cardiac(?: and (?:mediastinal|hilar)(?: and hilar)?)? (?:silhouettes?|contours?|size"
    r"|shadow|diameter|dimensions?))\b"
)
_MEDIASTINUM_SUBJECT = re.compile(
    r"\b(?:(?:superior )?mediastinum|mediastinal(?: and hilar)? (?:silhouettes?|contours?|width"
    r"|configuration|structures|shadows?|borders?))\b"
)
_CARDIOMEDIASTINAL_SUBJECT = re.compile(
    r"\bcardio[- ]?mediastin(?:al|um)(?: (?:and hilar )?(?:silhouettes?|contours?|shadows?"
    r"|size|width|configuration|borders?))?\b"
)
_ATTR_RANGE = re.compile(
    r"\b(?:top[- ]normal|high[- ]normal|upper (?:limits? of )?normal|normal|borderline)"
    r"(?: (?:in )?size)? to (?:(?:mildly|slightly|minimally|moderately) )?"
    r"(?:enlarged|large|prominent|widened|increased)\b"
)
_ATTR_POSITIVE = re.compile(
    r"\b(?:enlarg\w*|widen\w*|wide|large|prominen\w+|increased|globular|dilat\w*)\b"
)
_ATTR_BORDERLINE = re.compile(r"\bborderline\b")
_ATTR_NORMAL = re.compile(r"\b(?:normal|unremarkable)\b")
# CheXpert: a stable / unchanged heart or mediastinum may be stably abnormal: uncertain.
_ATTR_STABLE = re.compile(
    r"\b(?:stable|unchanged|similar|not changed|unaltered|constant"
    r"|no (?:significant |appreciable |interval )*change)\b"
)
_ATTR_ANY = re.compile(
    "|".join(p.pattern for p in (_ATTR_POSITIVE, _ATTR_BORDERLINE, _ATTR_NORMAL, _ATTR_STABLE))
)
_ATTR_NEGATED = re.compile(r"\b(?:not|no|without|nor)\s+(?:\w+\s+)?$")
_ATTR_HEDGED = re.compile(
    r"\b(?:may|might|could|possibl\w*|probabl\w*|questionabl\w*|borderline|suspected|perhaps)\b"
)
_ATTR_WINDOW_STOP = re.compile(
    r",|;|\b(?:with|without|but)\b|\band\s+(?:there|a|an|no|small|large|moderate|mild)\b"
)

# --------------------------------------------------------------------------------------
# CheXpert-style labeler: negation and uncertainty rules
# --------------------------------------------------------------------------------------

# Clause boundaries end every negation / uncertainty scope (NegEx's terminators):
# contrast words, relative "which", ", and there", ", with", a comma that opens a new
# "X is ..." clause (but not a list: ", or consolidation is seen" stays in scope), and a
# comma before a severity word or "new" ("no pneumothorax, small left effusion"): those
# open an asserted finding, never an item of a negated list ("no A, B, or C"). "large" is
# left out ("no consolidation, large effusion, or pneumothorax" is a negated list), so are
# "small or large" and a word ending the sentence; "stable" / "unchanged" too, as they
# also qualify heart and mediastinum size ("heart normal, stable mediastinal contours").
_CLAUSE_BREAK = re.compile(
    r"\s*[;:]\s*|\s+-\s+"
    r"|,?\s*\b(?:but|however|although|though|whereas|while|except|yet|which|apart from"
    r"|aside from|other than|with the exception of)\b"
    r"|,\s+and\s+(?=(?:there|the|this|these|it|a|an|no)\b)"
    r"|\s+and\s+(?=there\s+(?:is|are|has|have|was|were)\b)"
    r"|,\s+with\b"
    r"|,\s+(?!(?:and|or|nor)\b)(?=(?:(?!(?:and|or|nor)\b)[\w'-]+\s+){1,3}"
    r"(?:is|are|was|were|has|have|remains?|appears?|persists?|measures?)\b)"
    r"|,\s+(?=(?:small|tiny|trace|minimal|mild|moderate|severe|new)\b(?!\s+or\b)(?!\W*$))"
)
# A forward scope also ends at "and <new subject> is ...".
_SCOPE_STOP = re.compile(
    r"\band\b(?=\s+(?:(?!(?:or|and|nor)\b)[\w'-]+\s+){1,3}"
    r"(?:is|are|was|were|has|have|remains?|persists?|appears?|measures?)\b)"
)
# Phrases that look negative but are not ("no change in the effusion", "not only",
# "nearly resolved"): blanked before negation triggers are searched.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|without|not)\s+(?:(?:significant|substantial|appreciable|definite|major|further"
    r"|marked|interval|relevant|notable|overall|gross|significantly|substantially)\s+){0,2}"
    r"(?:change|changed|increase|increased|decrease|decreased|worsening|worsened|improvement"
    r"|improved|progression|difference|only)\b"
    r"|\b(?:nearly|almost|partially|mostly|largely|incompletely|not\s+(?:completely|entirely"
    r"|fully))\s+(?:completely\s+|entirely\s+|fully\s+)?(?:resolved|cleared|removed)\b"
    r"|\bgram[- ]negative\b"
)
# Pre-negation uncertainty (CheXpert's first pass): "cannot be excluded" contains a
# "not" but means "possible"; matched first and masked from the negation search.
_PRE_NEGATION_UNCERTAINTY = re.compile(
    r"\b(?:cannot|can ?not|can't|could not|does not|do not|difficult to|unable to|not able to"
    r"|hard to)\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+|fully\s+|totally\s+)?"
    r"(?:exclude[ds]?|ruled?\s+out|assess(?:ed)?|evaluated?)\b"
    r"|\bnot\s+(?:be\s+)?(?:entirely\s+|completely\s+|definitely\s+|fully\s+)?"
    r"(?:excluded|ruled\s+out)\b"
    r"|\bnot\s+(?:well|clearly|optimally|fully|entirely)\s+(?:seen|visualized|evaluated"
    r"|assessed|imaged|demonstrated)\b"
)
# Negation cues before a mention (scope: to the clause end).
_NEGATION_PRE = re.compile(
    r"\b(?:no|not|without|nor|neither|negative\s+for|free\s+of|clear\s+of|absen(?:ce|t)\s+of"
    r"|resol(?:ution|ved)(?:\s+of)?|removal\s+of|ruled?\s+out|exclude[sd]?)\b"
)
# Negation cues after a mention ("the effusion has resolved", "pneumothorax is not seen").
_NEGATION_POST = re.compile(
    r"\bnot\s+(?:[a-z]+\s+)?(?:seen|identified|visualized|visible|appreciated|demonstrated"
    r"|present|evident|detected|noted|apparent|enlarged|widened|dilated)\b"
    r"|\bno\s+longer\b|\b(?:resolved|cleared|disappeared|removed|absent|excluded|ruled\s+out)\b"
)
# "no findings to suggest pneumonia", "not concerning for": the hedge is negated.
_NEGATED_HEDGE = re.compile(
    r"\b(?:no|without|not)\b[^,;.]{0,40}?\b(?P<hedge>to\s+(?:suggest|indicate)"
    r"|(?:concerning|suspicious|worrisome)\s+for|concern\s+for|suggestive\s+of"
    r"|suspicion\s+(?:of|for))\b"
)
# Uncertainty cues before a mention. "likely" / "most likely" / "consistent with" stay
# positive (CheXpert has no "likely" rule); "less likely" and "unlikely" are uncertain.
_UNCERTAINTY_PRE = re.compile(
    r"\b(?:may|might|could|would|possible|possibly|probable|probably|presumed|presumably"
    r"|presumptive|questionabl[ey]|question\s+of|questioned|suspicious|suspected|suspect"
    r"|suspicion|concerning|concern|worrisome|suggest|suggests|suggestive|suggesting"
    r"|suggestion|differential|versus|vs|equivocal|indeterminate|uncertain|unclear|borderline"
    r"|less\s+likely|unlikely|favou?rs?|favou?red|consider|considered|consideration|maybe"
    r"|perhaps|potential|potentially|evaluate\s+for|assess\s+for)\b|\?"
)
# Uncertainty cues after a mention ("pneumonia is possible", "effusion may be present").
_UNCERTAINTY_POST = re.compile(
    r"\b(?:possible|suspected|questioned|questionable|considered|favou?red|less\s+likely"
    r"|unlikely|equivocal|uncertain|in\s+question|a\s+consideration)\b"
    r"|\b(?:may|might|could|can)\s+(?:also\s+|still\s+)?(?:be\s+)?(?:present|seen|developing"
    r"|evolving|exist|contributing|superimposed|obscured|hidden|masked)\b|\?"
)
# Backward scope of a post cue: the mention must be its subject, so no other verb may
# sit between them except the cue's own auxiliaries ("has been", "is now").
_VERBS = frozenset(
    "is are was were has have had remains remain appears appear demonstrates shows "
    "measures persists persist noted seen".split()
)
_WORD = re.compile(r"[a-z0-9_]+(?:['-][a-z0-9_]+)*|\?")
# "A or B", "A versus B", "A/B": both are uncertain (CheXpert's conj:or / versus rules).
_OR_GAP = re.compile(r"^\s*(?P<comma>,)?\s*(?:and/or|or|versus|vs\.?|/)\s*(?:[a-z-]+\s+){0,3}$")
_COMMA_GAP = re.compile(r"^\s*,\s*(?:[a-z-]+\s+){0,3}$")

_LUNGS_CLEAR = frozenset({"Lung Opacity", "Consolidation", "Pneumonia", "Edema"})
_NO_ACUTE = frozenset({"Edema", "Consolidation", "Pneumonia", "Pneumothorax"})
# Statements that imply negatives without naming an observation; they only fill
# labels that nothing in the report mentions (see label_report).
_IMPLIED_NEGATIVES: tuple[tuple[re.Pattern[str], frozenset[str]], ...] = (
    (
        re.compile(
            r"\blungs? (?:(?:are|is|remain|remains|appear|appears|otherwise|now|again|grossly"
            r"|essentially|well[- ]expanded and|well[- ]inflated and) )*"
            r"(?:clear|well[- ]aerated)\b|\bclear lungs?\b"
        ),
        _LUNGS_CLEAR,
    ),
    (
        re.compile(
            r"\bno (?:[a-z]+ ){0,3}(?:acute|active) (?:cardiopulmonary|intrathoracic|pulmonary"
            r"|cardiac or pulmonary|chest) (?:process|abnormalit\w+|disease|findings?|pathology"
            r"|change)"
        ),
        _NO_ACUTE,
    ),
    (
        re.compile(
            r"\b(?:costophrenic|cp) angles? (?:(?:are|is|remain|appear) )?(?:[a-z]+ )?"
            r"(?:sharp|clear|preserved|well[- ]defined)\b"
        ),
        frozenset({"Pleural Effusion"}),
    ),
)

_PRIORITY = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


# --------------------------------------------------------------------------------------
# CheXpert-style labeler: the engine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hit:
    """One mention in a sentence: its label, the regions it speaks of, span and value."""

    label: str
    regions: tuple[str, ...]
    start: int
    end: int
    value: float


@dataclass(frozen=True)
class _Cue:
    start: int
    end: int
    value: float
    strong: bool = False  # pre-negation uncertainty: wins over any negation


def _prepare(sentence: str) -> str:
    s = sentence.lower()
    s = re.sub(r"\bw/o\b", "without", s)
    s = re.sub(r"\bw/", "with ", s)
    s = s.replace("s/p", "status post").replace("r/o", "rule out").replace("&", " and ")
    s = re.sub(r"[\u2013\u2014]", " - ", s)
    return re.sub(r"\s+", " ", s).strip()


def _blank(text: str, spans: Iterable[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def _clauses(s: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for m in _CLAUSE_BREAK.finditer(s):
        if m.start() > start:
            out.append((start, m.start()))
        start = max(start, m.end())
    out.append((start, len(s)))
    return out


def _cues(s: str) -> tuple[list[_Cue], list[_Cue]]:
    """Negation / uncertainty cues of a sentence: (before-mention cues, after-mention cues)."""
    masked = _blank(s, (m.span() for m in _PSEUDO_NEGATION.finditer(s)))
    strong = [m.span() for m in _PRE_NEGATION_UNCERTAINTY.finditer(masked)]
    pre = [_Cue(a, b, UNCERTAIN, strong=True) for a, b in strong]
    post = list(pre)
    masked = _blank(masked, strong)
    hedges = _blank(masked, (m.span("hedge") for m in _NEGATED_HEDGE.finditer(masked)))
    pre += [_Cue(*m.span(), NEGATIVE) for m in _NEGATION_PRE.finditer(masked)]
    post += [_Cue(*m.span(), NEGATIVE) for m in _NEGATION_POST.finditer(masked)]
    pre += [_Cue(*m.span(), UNCERTAIN) for m in _UNCERTAINTY_PRE.finditer(hedges)]
    post += [_Cue(*m.span(), UNCERTAIN) for m in _UNCERTAINTY_POST.finditer(hedges)]
    return pre, post


def _subject_of(gap: str) -> bool:
    """Whether a mention followed by `gap` is the subject of the cue that follows the gap."""
    words = _WORD.findall(gap)
    if len(words) > 10:
        return False
    return all(i >= len(words) - 3 for i, w in enumerate(words) if w in _VERBS)


def _mention_value(
    s: str,
    span: tuple[int, int],
    clause: tuple[int, int],
    base: float,
    cues: tuple[list[_Cue], list[_Cue]],
) -> float:
    """The value of one mention: the nearest cue before it in its clause decides; else the
    nearest cue after it whose subject it is; else its base value. Pre-negation
    uncertainty ("cannot be excluded") anywhere in either position wins."""
    (ms, me), (cs, ce) = span, clause
    pre_cues, post_cues = cues
    stops = [m.start() for m in _SCOPE_STOP.finditer(s, cs, ce)]
    pre = [
        c
        for c in pre_cues
        if cs <= c.start and c.end <= ms and not any(c.end <= p < ms for p in stops)
    ]
    post = [c for c in post_cues if me <= c.start and c.end <= ce and _subject_of(s[me : c.start])]
    if any(c.strong for c in pre + post):
        return UNCERTAIN
    if pre:
        return max(pre, key=lambda c: c.end).value
    if post:
        return min(post, key=lambda c: c.start).value
    return base


def _attribute_value(window: str) -> float | None:
    """The label a size statement gives its subject. Ranges ("normal to mildly enlarged")
    and borderline are uncertain; enlarged / widened / prominent are positive unless
    negated ("not enlarged") or hedged ("may be enlarged"); normal / unremarkable
    (including "top normal", "upper limits of normal", as CheXpert) are negative; stable
    / unchanged alone is uncertain (CheXpert: it may be stably enlarged)."""
    if _ATTR_RANGE.search(window):
        return UNCERTAIN
    m = _ATTR_POSITIVE.search(window)
    if m:
        before = window[: m.start()]
        if _ATTR_NEGATED.search(before):
            return NEGATIVE
        return UNCERTAIN if _ATTR_HEDGED.search(before) else POSITIVE
    if _ATTR_BORDERLINE.search(window):
        return UNCERTAIN
    if _ATTR_NORMAL.search(window):
        return NEGATIVE
    if _ATTR_STABLE.search(window):
        return UNCERTAIN
    return None


def _subject_value(
    s: str, subject: tuple[int, int], clause: tuple[int, int], others: list[tuple[int, int]]
) -> float | None:
    """Find what is said of a heart / mediastinum subject: an adjective just before it
    ("enlarged heart", "normal cardiomediastinal silhouette"), else the predicate after it
    ("heart size is normal", "heart and mediastinum are normal"), else an adjective shared
    by a list ("normal heart size, mediastinal and hilar contours")."""
    (ss, se), (cs, ce) = subject, clause
    stop = max([e for s0, e in others if e <= ss] + [cs])
    words = [m.start() for m in _WORD.finditer(s, stop, ss)][-5:]
    if words and (v := _attribute_value(s[words[0] : ss])) is not None:
        return v
    first = _ATTR_ANY.search(s, se, ce)
    if first and len(_WORD.findall(s[se : first.start()])) <= 10:
        end = min(
            [s0 for s0, _ in others if s0 >= first.end()]
            + [m.start() for m in _ATTR_WINDOW_STOP.finditer(s, first.end(), ce)]
            + [ce]
        )
        if (v := _attribute_value(s[se:end])) is not None:
            return v
    words = [m.start() for m in _WORD.finditer(s, cs, ss)][-10:]
    return _attribute_value(s[words[0] : ss]) if words else None


def _or_uncertain(s: str, hits: list[_Hit]) -> list[_Hit]:
    """Mentions joined by "or" / "versus" / "/" (and a ", or" list) become uncertain."""
    items = sorted((h for h in hits if h.label != "Support Devices"), key=lambda h: h.start)
    marked: set[int] = set()
    links: list[str | None] = []
    for a, b in zip(items, items[1:], strict=False):
        gap = s[a.end : b.start] if b.start >= a.end else None
        if gap is not None and (m := _OR_GAP.match(gap)):
            links.append("or," if m.group("comma") else "or")
        elif gap is not None and _COMMA_GAP.match(gap):
            links.append(",")
        else:
            links.append(None)
    for i, link in enumerate(links):
        if link and link.startswith("or"):
            marked |= {id(items[i]), id(items[i + 1])}
            j = i - 1
            while link == "or," and j >= 0 and links[j] == ",":
                marked.add(id(items[j]))
                j -= 1
    return [
        _Hit(h.label, h.regions, h.start, h.end, UNCERTAIN)
        if id(h) in marked and h.value == POSITIVE
        else h
        for h in hits
    ]


@functools.lru_cache(maxsize=65536)
def _analyse(sentence: str) -> tuple[tuple[_Hit, ...], frozenset[str]]:
    """All mentions of one sentence with their values, and the labels it implies negative."""
    s = _prepare(sentence)
    clauses = _clauses(s)

    def clause_of(pos: int) -> tuple[int, int]:
        return next((c for c in clauses if c[0] <= pos < c[1]), (pos, len(s)))

    cues = _cues(s)
    hits: list[_Hit] = []
    candidates = sorted(
        (
            (m.start(), -m.end(), label, regions, base)
            for label, regions, base, rx in _MENTION_TABLE
            for m in rx.finditer(s)
        ),
    )
    taken: dict[str, list[tuple[int, int]]] = {}
    for start, neg_end, label, regions, base in candidates:
        end = -neg_end
        if any(a < end and start < b for a, b in taken.get(label, [])):
            continue  # a longer mention of the same label already covers this one
        taken.setdefault(label, []).append((start, end))
        value = _mention_value(s, (start, end), clause_of(start), base, cues)
        hits.append(_Hit(label, regions, start, end, value))
    hits = _or_uncertain(s, hits)

    subjects = [
        (m.span(), kind)
        for kind, rx in (
            ("heart", _HEART_SUBJECT),
            ("mediastinum", _MEDIASTINUM_SUBJECT),
            ("cardiomediastinal", _CARDIOMEDIASTINAL_SUBJECT),
        )
        for m in rx.finditer(s)
    ]
    for span, kind in subjects:
        others = [o for o, _ in subjects if o[1] <= span[0] or o[0] >= span[1]]
        value = _subject_value(s, span, clause_of(span[0]), others)
        if value is None:
            continue
        if kind == "heart":
            hits.append(_Hit("Cardiomegaly", ("heart",), *span, value))
        elif kind == "mediastinum":
            hits.append(_Hit("Enlarged Cardiomediastinum", ("mediastinum",), *span, value))
        else:
            # The cardiomediastinal silhouette: enlarged or stable speaks of the whole
            # (Enlarged Cardiomediastinum only, as CheXpert); normal clears the heart too.
            both = ("mediastinum", "heart")
            hits.append(_Hit("Enlarged Cardiomediastinum", both, *span, value))
            if value == NEGATIVE:
                hits.append(_Hit("Cardiomegaly", both, *span, value))

    implied = frozenset().union(*(labels for rx, labels in _IMPLIED_NEGATIVES if rx.search(s)))
    return tuple(sorted(hits, key=lambda h: h.start)), implied


def _combine(a: float | None, b: float) -> float:
    """CheXpert's aggregation: positive beats uncertain beats negative."""
    return b if a is None or _PRIORITY[b] > _PRIORITY[a] else a


def _label_text(text: str) -> str:
    """What is labeled: findings + impression when the report has them, as CheXpert labels
    the report body (never the indication, history or comparison), else findings_text."""
    sections = parse_sections(text)
    parts = [sections[k] for k in ("findings", "impression") if k in sections]
    return "\n\n".join(parts) if parts else findings_text(text)


def label_report(text: str, *, hierarchy: bool = True) -> dict[str, float | None]:
    """Label a report with the 14 CheXpert observations: POSITIVE (1.0), NEGATIVE (0.0),
    UNCERTAIN (-1.0) or None (not mentioned).

    The labeled text is the findings + impression (or, without them, findings_text()).
    Each sentence is searched for mentions (phrase tables after CheXpert's, synonyms and
    morphology included); each mention is classified by the nearest cue before it in its
    clause ("no", "without", "free of", "negative for", "resolution of" / "may",
    "possible", "suspicious for", "versus", ...), else by a cue after it whose subject it
    is ("has resolved", "is not seen" / "cannot be excluded", "is possible"), with
    CheXpert's pre-negation uncertainty ("cannot exclude", "not excluded") overriding
    the negation it contains. Scopes end at the clause ("but", "however", "although",
    ";", ", with", "which", ", and there", a comma opening "X is ..."). Mentions joined by
    "or" / "versus" / "/" are uncertain. Decisions:

    - "likely X" / "most likely X" / "consistent with X" are POSITIVE (CheXpert has no
      "likely" rule); "less likely" and "unlikely" are UNCERTAIN.
    - "no new X" is NEGATIVE (CheXpert says uncertain; an old X would be stated).
    - Congestion / cephalization / vascular prominence are Edema UNCERTAIN, blunted
      costophrenic angles Pleural Effusion UNCERTAIN (CheXpert's convention). "CHF" /
      "heart failure" are Edema (CheXpert also marks Cardiomegaly uncertain; we do not:
      heart size is reported on its own). "Lesion" alone, calcified nodules, granulomas
      and surgical clips are not Lung Lesion / Support Devices (CheXpert's choices);
      "volume loss" is Atelectasis, "airspace disease" Lung Opacity.
    - Heart / mediastinum size statements: enlarged -> POSITIVE, normal / top normal ->
      NEGATIVE, borderline / "normal to mildly enlarged" / stable-unchanged ->
      UNCERTAIN (CheXpert). A normal cardiomediastinal silhouette negates both
      Cardiomegaly and Enlarged Cardiomediastinum; an enlarged one is Enlarged
      Cardiomediastinum only.
    - Several mentions of an observation combine as CheXpert does: POSITIVE beats
      UNCERTAIN beats NEGATIVE.
    - Implied negatives fill only labels nothing else set: "lungs are clear" negates
      Lung Opacity, Consolidation, Pneumonia and Edema (a clear lung has no airspace or
      interstitial opacity; atelectasis, nodules and the pleura are not promised);
      "no acute cardiopulmonary process" negates Edema, Consolidation, Pneumonia and
      Pneumothorax (acute processes only: chronic findings such as effusions,
      cardiomegaly or scarring commonly coexist with that phrase); "sharp costophrenic
      angles" negate Pleural Effusion.
    - hierarchy=True (CheXpert's Lung Opacity > Edema, Consolidation, Pneumonia, Lung
      Lesion, Atelectasis; Enlarged Cardiomediastinum > Cardiomegaly): a parent that no
      sentence mentions takes POSITIVE if a child is POSITIVE, else UNCERTAIN if a child
      is UNCERTAIN. An explicit parent (even NEGATIVE: "no focal opacity; bibasilar
      atelectasis") is never overridden, and children never take a parent's value.
    - No Finding is POSITIVE iff nothing but Support Devices is POSITIVE or UNCERTAIN,
      counting findings outside the 14 (emphysema, granuloma, hernia, scoliosis, ...,
      CheXpert's no_finding list); otherwise None, as CheXpert leaves it blank.
      A blank text gets None everywhere.
    """
    body = _label_text(text)
    if not body.strip():
        return dict.fromkeys(CHEXPERT_LABELS)
    return _aggregate(split_sentences(body), hierarchy=hierarchy)


def _aggregate(sentences: Iterable[str], *, hierarchy: bool) -> dict[str, float | None]:
    """label_report's rules applied to a list of sentences."""
    found: dict[str, float] = {}
    implied: set[str] = set()
    for sentence in sentences:
        hits, negatives = _analyse(sentence)
        for h in hits:
            found[h.label] = _combine(found.get(h.label), h.value)
        implied |= negatives
    other = found.pop(_OTHER, None)
    if hierarchy:
        for parent, children in LABEL_HIERARCHY.items():
            if parent not in found:
                child_values = [found[c] for c in children if found.get(c) in (POSITIVE, UNCERTAIN)]
                if child_values:
                    found[parent] = max(child_values, key=_PRIORITY.__getitem__)
    for label in implied:
        found.setdefault(label, NEGATIVE)
    labels: dict[str, float | None] = dict.fromkeys(CHEXPERT_LABELS)
    labels.update(found)
    abnormal = [
        v for k, v in found.items() if k != "Support Devices" and v in (POSITIVE, UNCERTAIN)
    ]
    if not abnormal and other not in (POSITIVE, UNCERTAIN):
        labels["No Finding"] = POSITIVE
    return labels


def labels_to_vector(labels: Mapping[str, float | None]) -> list[float | None]:
    """The labels as a list in CHEXPERT_LABELS order (missing ones are None)."""
    unknown = set(labels) - set(CHEXPERT_LABELS)
    if unknown:
        raise ValueError(
            f"unknown label names {sorted(unknown)}; expected names from CHEXPERT_LABELS: "
            f"{list(CHEXPERT_LABELS)}"
        )
    return [labels.get(name) for name in CHEXPERT_LABELS]


# --------------------------------------------------------------------------------------
# Report normalization (ECHO): every region stated, in REGIONS order
# --------------------------------------------------------------------------------------

# Anatomy words that place a sentence in a region when it names no finding.
REGION_KEYWORDS: dict[str, str] = {
    "thorax": r"thorax|chest wall|soft tissues?|subcutaneous|body habitus|breasts?|axilla\w*"
    r"|skin ?folds?",
    "mediastinum": r"(?:cardio)?mediastin\w*|trache\w*|carina|aort\w*|paratracheal|thyroid"
    r"|esophag\w*|superior vena cava|svc|azygos|thoracic inlet",
    "lungs": r"lungs?|parenchym\w*|lobes?|lobar|lingul\w*|air ?space",
    "vasculature": r"vascul\w*|vessels?|pulmonary arter(?:y|ies)|pulmonary veins?",
    "heart": r"heart|cardiac|cardiomediastin\w*|pericardi\w*",
    "hila": r"hil(?:um|a|ar|us)",
    "diaphragm": r"(?:hemi)?diaphragm\w*|costophrenic|pleura\w*|fissures?|subpulmonic",
    "bones": r"bones?|bony|osseous|ribs?|spine|spinal|vertebra\w*|clavicles?|scapula\w*"
    r"|sternum|shoulders?|humer\w*|skelet\w*",
    "devices": r"devices?|hardware|apparatus",
}
_REGION_KEYWORD_RE = tuple((r, re.compile(rf"\b(?:{p})\b")) for r, p in REGION_KEYWORDS.items())

# Negative statements added for a region the report does not mention. Each one speaks
# only of its own region's observations (the pleura, not the lungs, holds effusions and
# pneumothorax), so it can never contradict a finding filed under another region; none
# says "the lungs are clear" because that would contradict edema (vasculature).
NEGATIVE_STATEMENTS: dict[str, tuple[str, ...]] = {
    "thorax": (
        "The soft tissues of the chest wall are unremarkable.",
        "No chest wall abnormality is seen.",
        "The thorax is symmetric without soft tissue abnormality.",
        "No subcutaneous emphysema is identified.",
        "The chest wall soft tissues are within normal limits.",
    ),
    "mediastinum": (
        "The mediastinum is not widened.",
        "Mediastinal contours are normal.",
        "The trachea is midline.",
        "The mediastinal silhouette is within normal limits.",
        "No mediastinal widening is seen.",
    ),
    "lungs": (
        "No focal consolidation is seen.",
        "There is no focal airspace consolidation.",
        "The lungs are well expanded without focal consolidation.",
        "No focal opacity to suggest pneumonia.",
        "The lungs show no focal consolidation.",
        "The lungs are well expanded.",
    ),
    "vasculature": (
        "Pulmonary vascularity is normal.",
        "There is no pulmonary vascular congestion.",
        "No pulmonary edema.",
        "The pulmonary vasculature is within normal limits.",
        "No evidence of pulmonary edema.",
    ),
    "heart": (
        "The heart size is normal.",
        "Heart size is within normal limits.",
        "The cardiac silhouette is normal in size.",
        "There is no cardiomegaly.",
        "The heart is not enlarged.",
    ),
    "hila": (
        "The hila are unremarkable.",
        "Hilar contours are normal.",
        "Both hila are normal in size.",
        "No hilar enlargement is seen.",
    ),
    "diaphragm": (
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pleural effusion or pneumothorax is identified.",
        "The costophrenic angles are sharp and there is no pneumothorax.",
        "The hemidiaphragms are normal without pleural effusion or pneumothorax.",
    ),
    "bones": (
        "No acute osseous abnormality.",
        "The visualized osseous structures are unremarkable.",
        "No displaced rib fracture is seen.",
        "The osseous structures are intact.",
        "No acute fracture is identified.",
    ),
    "devices": (
        "No support devices are seen.",
        "No lines or tubes are present.",
        "There are no indwelling lines or tubes.",
        "No medical devices are identified.",
    ),
}

# A region whose abnormality is stated inside another region's sentence ("moderate
# cardiomegaly with pulmonary vascular congestion") gets a pointer to it, never a
# negative statement that would contradict the finding.
_POINTER_SUBJECT = {
    "thorax": "Chest wall",
    "mediastinum": "Mediastinal",
    "lungs": "Lung",
    "vasculature": "Pulmonary vascular",
    "heart": "Cardiac",
    "hila": "Hilar",
    "diaphragm": "Pleural",
    "bones": "Osseous",
    "devices": "Support device",
}
POINTER_STATEMENTS: dict[str, tuple[str, ...]] = {
    region: tuple(
        template.format(subject=subject, where=where)
        for where in ("above", "below")
        for template in (
            "{subject} findings as described {where}.",
            "{subject} findings are described {where}.",
        )
    )
    for region, subject in _POINTER_SUBJECT.items()
}

NORMAL_IMPRESSIONS: tuple[str, ...] = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
    "No radiographic evidence of acute cardiopulmonary disease.",
    "No acute cardiopulmonary findings.",
)

# Sentences that are not findings: comparisons, notifications, recommendations,
# technique. Dropped only when the rest of the report already carries their labels.
_NON_FINDING = re.compile(
    r"^(?:comparison|compared\s+(?:to|with)|in\s+comparison|as\s+compared"
    r"|prior\s+(?:study|studies|exam|radiograph)|since\s+the\s+(?:prior|previous|last))\b"
    r"|\b(?:discussed|communicated|telephoned|paged|notified|conveyed|informed|relayed|spoke"
    r"|d/w)\b|\bwet\s+read\b|\b\d{1,2}:\d{2}\b"
    r"|\b(?:recommend\w*|advised?|follow[- ]?up|further\s+(?:evaluation|assessment|imaging)"
    r"|clinical\s+correlation|correlate\s+clinically|if\s+clinically\s+(?:indicated|warranted)"
    r"|would\s+be\s+(?:helpful|useful))\b"
    r"|^(?:pa|ap|portable|upright|supine|semi-?upright|frontal|lateral|single|two|bedside)\b"
    r".*\b(?:views?|radiographs?|images?|films?|projections?)\b"
    r"|\b(?:views?|images?|radiographs?)\s+(?:of\s+the\s+chest\s+)?(?:were|was)\s+"
    r"(?:obtained|acquired|provided|submitted)\b",
    re.IGNORECASE,
)
_INLINE_HEADER = re.compile(rf"(?i)\b(?:{_KNOWN_HEADER})\s*:\s*")


def _layout(sentence: str) -> tuple[str | None, tuple[str, ...], tuple[_Hit, ...]]:
    """(main region, all regions in order of appearance, mentions) of a sentence.

    The main region is that of the first finding mentioned (so "moderate cardiomegaly
    with vascular congestion" is a heart sentence); a sentence naming no finding goes to
    its first anatomy keyword ("the lungs are clear" -> lungs).
    """
    hits, _ = _analyse(sentence)
    s = _prepare(sentence)
    places = [(h.start, i, r) for h in hits for i, r in enumerate(h.regions)]
    places += [(m.start(), 0, r) for r, rx in _REGION_KEYWORD_RE for m in rx.finditer(s)]
    order = [r for _, _, r in sorted(places, key=lambda p: (p[0], p[1], REGIONS.index(p[2])))]
    regions = tuple(dict.fromkeys(order))
    main = hits[0].regions[0] if hits else (regions[0] if regions else None)
    if main is not None:
        regions = (main, *(r for r in regions if r != main))
    return main, regions, hits


def sentence_regions(sentence: str) -> tuple[str, ...]:
    """Every region a sentence speaks of, its main region (sentence_region) first."""
    return _layout(sentence)[1]


def sentence_region(sentence: str) -> str | None:
    """The region a sentence is filed under in a normalized report, or None.

    It is the region of the first finding the sentence mentions (mention -> region:
    Enlarged Cardiomediastinum -> mediastinum; Cardiomegaly, pericardial effusion ->
    heart; Lung Opacity / Lesion, Consolidation, Pneumonia, Atelectasis, emphysema,
    granuloma -> lungs; Edema and vascular congestion -> vasculature; Pneumothorax,
    Pleural Effusion / Other, hernia, free air -> diaphragm (pleural spaces); Fracture,
    degenerative changes -> bones; Support Devices -> devices; subcutaneous emphysema ->
    thorax; hilar enlargement -> hila), else the region of its first anatomy keyword
    (REGION_KEYWORDS: "trachea" -> mediastinum, "osseous" -> bones, ...).
    """
    return _layout(sentence)[0]


def _sentence_values(hits: Iterable[_Hit]) -> dict[str, float]:
    values: dict[str, float] = {}
    for h in hits:
        values[h.label] = _combine(values.get(h.label), h.value)
    return values


def _clean_sentence(sentence: str) -> str | None:
    """A sentence as it appears in a normalized report: no list marker, no "___"
    placeholder (with the words that only framed it: "Dr. ___", "on ___ at ___ pm",
    "___ cm"), tidy spacing, a capital first letter and a final period."""
    s = _LIST_MARKER.sub("", sentence.strip())
    s = _INLINE_HEADER.sub("", s)
    s = re.sub(r"(?i)\b(?:dr|drs|doctor)\.?\s*___", "", s)
    s = re.sub(r"(?i)\s*\b(?:on|from|dated|at|since)\s+___(?:\s*(?:am|pm|a\.m\.|p\.m\.))?", "", s)
    s = re.sub(
        r"(?i)\s*\b(?:measuring|measures|approximately|about|up to)?\s*___\s*(?:cm|mm)\b", "", s
    )
    s = s.replace("___", " ")
    s = re.sub(r"\(\s*\)", " ", s)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s+([,.;:?!])", r"\1", s)
    s = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", s)
    s = s.strip(" ,;:-")
    if len(re.findall(r"[A-Za-z]{2,}", s)) < 2:
        return None
    s = re.sub(r"[,;:.!]+$", "", s)
    if s.endswith("?"):
        # A trailing "?" is a hedge ("pneumonia?"); keep it unless a period says the same.
        s = s[:-1] if _analyse(s[:-1] + ".") == _analyse(s) else s
    if not s.endswith("?"):
        s += "."
    return s[0].upper() + s[1:]


def _clean_all(sentences: Iterable[str]) -> list[str]:
    out: dict[str, str] = {}
    for sentence in sentences:
        cleaned = _clean_sentence(sentence)
        if cleaned and cleaned.lower() not in out:
            out[cleaned.lower()] = cleaned
    return list(out.values())


def _keep_informative(findings: list[str], impression: list[str]) -> tuple[list[str], list[str]]:
    """Drop non-finding sentences (comparison, notification, recommendation, technique,
    or, in the findings, no region at all) whose positive / uncertain labels the kept text
    already has. The findings are judged on their own (so a findings sentence never
    leans on its copy in a summary impression); the impression against both."""

    def droppable(s: str, in_findings: bool) -> bool:
        return bool(_NON_FINDING.search(s)) or (in_findings and sentence_region(s) is None)

    def keep(sentences: list[str], in_findings: bool, kept: dict[str, float]) -> list[str]:
        for s in sentences:
            if not droppable(s, in_findings):
                for label, v in _sentence_values(_analyse(s)[0]).items():
                    kept[label] = _combine(kept.get(label), v)
        out = []
        for s in sentences:
            values = _sentence_values(_analyse(s)[0])
            needed = any(
                v in (POSITIVE, UNCERTAIN) and _PRIORITY[v] > _PRIORITY.get(kept.get(label), 0)
                for label, v in values.items()
            )
            if not droppable(s, in_findings) or needed:
                out.append(s)
                for label, v in values.items():
                    kept[label] = _combine(kept.get(label), v)
        return out

    kept: dict[str, float] = {}
    findings = keep(findings, True, kept)
    return findings, keep(impression, False, kept)


def normalize_report(text: str, *, seed: int | str = 0) -> str:
    """Rewrite a report so that it states every region explicitly (the ECHO normalization).

    Returns one line: "FINDINGS: <sentences> IMPRESSION: <sentences>".

    - The findings (else the impression, else findings_text) are split into sentences,
      cleaned ("___" placeholders and the words framing them removed, one final period)
      and de-duplicated. Comparison, notification, recommendation and technique
      sentences, and sentences with no region, are dropped unless they carry a positive
      or uncertain label that nothing else in the report carries.
    - Each kept sentence, in the radiologist's own wording, is filed under its main
      region (sentence_region: the region of its first finding, else of its first anatomy
      word) and the findings are ordered by REGIONS.
    - A region with no sentence of its own gets one statement: a pointer
      (POINTER_STATEMENTS, "Pulmonary vascular findings as described above.") when
      another region's sentence states a positive or uncertain finding of it, else a
      negative statement (NEGATIVE_STATEMENTS) drawn by a random generator seeded from
      (seed, text). So every region is the main region of at least one sentence.
    - The impression is the report's own impression, cleaned the same way; without one,
      up to three findings sentences (not comparisons or other non-findings) with a
      positive or uncertain CheXpert observation, else a NORMAL_IMPRESSIONS paraphrase.

    Deterministic for (text, seed); other seeds vary the wording. Labels are preserved:
    nothing positive or uncertain is dropped and every added statement is negative or
    label-free. Normalizing a normalized report adds nothing (each region already has a
    sentence and duplicates are removed).
    """
    sections = parse_sections(text)
    findings_src = sections.get("findings")
    impression_src = sections.get("impression")
    if findings_src is None:
        findings_src = impression_src if impression_src is not None else findings_text(text)
    rng = random.Random(f"{seed}\x00{text}")
    findings, impression = _keep_informative(
        _clean_all(split_sentences(findings_src)),
        _clean_all(split_sentences(impression_src or "")),
    )

    by_region: dict[str, list[str]] = {r: [] for r in REGIONS}
    secondary: dict[str, list[tuple[str, float]]] = {r: [] for r in REGIONS}
    for s in findings:
        main, _, hits = _layout(s)
        by_region[main].append(s)  # kept findings always have a region
        for h in hits:
            for r in h.regions:
                if r != main:
                    secondary[r].append((main, h.value))
    labels = _aggregate(findings + impression, hierarchy=True)
    held = {k for k, v in labels.items() if v in (POSITIVE, UNCERTAIN)}
    out: list[str] = []
    for index, region in enumerate(REGIONS):
        if by_region[region]:
            out += by_region[region]
            continue
        abnormal = [m for m, v in secondary[region] if v in (POSITIVE, UNCERTAIN)]
        # A negative statement may not name an observation the report holds positive or
        # uncertain: "the mediastinum is not widened" would override the Enlarged
        # Cardiomediastinum that an enlarged heart implies (hierarchy).
        negatives = [
            n
            for n in NEGATIVE_STATEMENTS[region]
            if not any(h.label in held for h in _analyse(n)[0])
        ]
        if abnormal or not negatives:
            first = REGIONS.index(abnormal[0]) if abnormal else 0
            where = "above" if first < index else "below"
            out.append(rng.choice([p for p in POINTER_STATEMENTS[region] if where in p]))
        else:
            out.append(rng.choice(negatives))

    if not impression:
        impression = [
            s
            for s in out
            if s in findings
            and not _NON_FINDING.search(s)
            and any(h.label != _OTHER and h.value in (POSITIVE, UNCERTAIN) for h in _analyse(s)[0])
        ][:3] or [rng.choice(NORMAL_IMPRESSIONS)]
    return f"FINDINGS: {' '.join(out)} IMPRESSION: {' '.join(impression)}"
