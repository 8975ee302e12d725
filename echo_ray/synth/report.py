"""Writing a study's report from its spec: the sentences by section (`report_sentences`,
reporting by exception from the grammar's tables) and the MIMIC-CXR-formatted text
(`write_report`)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence

import numpy as np

from echo_ray.synth.findings import (
    FINDING_TYPES,
    LOBES,
    LUNG_OPACITY_TYPES,
    RIB_ORDINALS,
    Finding,
    StudySpec,
)
from echo_ray.synth.grammar import (
    ADDENDUM_TEMPLATES,
    COMPARISON_TEMPLATES,
    EXAMINATION_TEXT,
    EXTRA_TEMPLATES,
    FINDING_TEMPLATES,
    FRAMING_TEMPLATES,
    GRADE_WORDS,
    IMPRESSION_NORMAL_TEMPLATES,
    IMPRESSION_TEMPLATES,
    INDICATION_REASONS,
    INDICATION_TEMPLATES,
    LUNG_FINDINGS,
    NEGATIVE_TEMPLATES,
    NORMAL_LUNG_TEMPLATES,
    TECHNIQUE_TEMPLATES,
    TIP_WORDS,
    _cap,
)
from echo_ray.synth.streams import _pick, _rng


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
