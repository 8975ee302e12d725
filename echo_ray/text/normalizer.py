"""The ECHO report normalization: normalize_report states every region of REGIONS, positive
or negative, in order, with paraphrase variety (NEGATIVE_STATEMENTS, POINTER_STATEMENTS and
NORMAL_IMPRESSIONS are the whole added vocabulary), preserving the labels; sentence_region
names the region a sentence is filed under.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from echo_ray.text.labeler import (
    PRIORITY,
    Hit,
    analyse_sentence,
    combine_values,
    label_sentences,
    prepare_sentence,
)
from echo_ray.text.labels import POSITIVE, REGIONS, UNCERTAIN
from echo_ray.text.mentions import OTHER
from echo_ray.text.sections import (
    KNOWN_HEADER,
    LIST_MARKER,
    findings_text,
    parse_sections,
    split_sentences,
)

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
_INLINE_HEADER = re.compile(rf"(?i)\b(?:{KNOWN_HEADER})\s*:\s*")


def _layout(sentence: str) -> tuple[str | None, tuple[str, ...], tuple[Hit, ...]]:
    """(main region, all regions in order of appearance, mentions) of a sentence.

    The main region is that of the first finding mentioned (so "moderate cardiomegaly
    with vascular congestion" is a heart sentence); a sentence naming no finding goes to
    its first anatomy keyword ("the lungs are clear" -> lungs).
    """
    hits, _ = analyse_sentence(sentence)
    s = prepare_sentence(sentence)
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


def _sentence_values(hits: Iterable[Hit]) -> dict[str, float]:
    values: dict[str, float] = {}
    for h in hits:
        values[h.label] = combine_values(values.get(h.label), h.value)
    return values


def _clean_sentence(sentence: str) -> str | None:
    """A sentence as it appears in a normalized report: no list marker, no "___"
    placeholder (with the words that only framed it: "Dr. ___", "on ___ at ___ pm",
    "___ cm"), tidy spacing, a capital first letter and a final period."""
    s = LIST_MARKER.sub("", sentence.strip())
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
        s = s[:-1] if analyse_sentence(s[:-1] + ".") == analyse_sentence(s) else s
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
                for label, v in _sentence_values(analyse_sentence(s)[0]).items():
                    kept[label] = combine_values(kept.get(label), v)
        out = []
        for s in sentences:
            values = _sentence_values(analyse_sentence(s)[0])
            needed = any(
                v in (POSITIVE, UNCERTAIN) and PRIORITY[v] > PRIORITY.get(kept.get(label), 0)
                for label, v in values.items()
            )
            if not droppable(s, in_findings) or needed:
                out.append(s)
                for label, v in values.items():
                    kept[label] = combine_values(kept.get(label), v)
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
    labels = label_sentences(findings + impression, hierarchy=True)
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
            if not any(h.label in held for h in analyse_sentence(n)[0])
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
            and any(
                h.label != OTHER and h.value in (POSITIVE, UNCERTAIN)
                for h in analyse_sentence(s)[0]
            )
        ][:3] or [rng.choice(NORMAL_IMPRESSIONS)]
    return f"FINDINGS: {' '.join(out)} IMPRESSION: {' '.join(impression)}"
