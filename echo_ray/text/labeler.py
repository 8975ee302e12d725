"""A rule-based labeler that follows the CheXpert labeler's three stages: extract
(mention and unmention phrases per observation, echo_ray.text.mentions, plus heart /
mediastinum size statements), classify (CheXpert's pre-negation uncertainty, then
negation, then post-negation uncertainty patterns), aggregate (POSITIVE > UNCERTAIN >
NEGATIVE across mentions, the "CHF" rule, the label hierarchy, No Finding). It is the
project's clinical metric; its decisions are listed in label_report's docstring.

CheXpert matches its patterns on a dependency graph (NegBio over a Bllip parse). There is
no parser here: each pattern is re-expressed as a cue before or after the mention, scoped
to the mention's clause (clauses end at contrast words, ";", ", with", "which", a comma
opening a new "X is ..." clause), with a cue after a mention required to have the mention
as its subject. Lists ("no A, B or C") fall inside one clause, which stands in for the
graph's conjunction propagation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from echo_ray.text.labels import CHEXPERT_LABELS, LABEL_HIERARCHY, NEGATIVE, POSITIVE, UNCERTAIN
from echo_ray.text.mentions import MENTION_TABLE, OTHER, UNMENTION_TABLE
from echo_ray.text.sections import findings_text, parse_sections, split_sentences

# --------------------------------------------------------------------------------------
# Heart and mediastinum size statements
# --------------------------------------------------------------------------------------

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
# Negation and uncertainty rules
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
    r"|\bno\s+(?:evidence\s+to\s+)?rule\s+out\b"
    r"|\bno\s+new(?:\s+areas?\s+of)?\b"
)
_PASSIVE = re.compile(
    r"\b(?:excluded|ruled\s+out|seen|visualized|evaluated|assessed|imaged|demonstrated)$"
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
    r"|perhaps|potential|potentially|evaluate\s+for|assess\s+for|secondary\s+to"
    r"|correlat\w*(?:\s+clinically)?\s+(?:for|to\s+exclude)|clinical\s+correlation)\b|\?"
)
# Hedge words used as attributes ("no suspicious opacity"): in a negated list the
# negation wins (CheXpert matches negation before post-negation uncertainty).
_ATTRIBUTIVE_HEDGE = re.compile(
    r"\b(?:suspicious|concerning|worrisome|questionable)\b(?!\s+(?:for|of)\b)"
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

_HEART_FAILURE = re.compile(r"\b(?:chf|heart failure)\b")
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

PRIORITY = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
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
    weak: bool = False  # attributive hedge: a negation in scope wins over it


# De-identification marks: Open-i's "XXXX" and MIMIC-CXR's "___" (glued to a word or not)
# become one opaque token, "___", so they neither split sentences nor join words.
_DEID = re.compile(r"X{3,}|_{2,}")
_SHORTHAND = (
    (re.compile(r"\bw/o\b"), "without"),
    (re.compile(r"\bw/"), "with "),
    (re.compile(r"\bs/p\b"), "status post"),
    (re.compile(r"\br/o\b"), "rule out"),
    (re.compile(r"\bc/w\b"), "consistent with"),
    (re.compile(r"\bb/l\b"), "bilateral"),
    (re.compile(r"&"), " and "),
    (re.compile(r"[\u2013\u2014]"), " - "),
)


def prepare_sentence(sentence: str) -> str:
    """The text every rule reads: de-identification marks made one token ("___"),
    lowercased, shorthand spelled out ("s/p", "w/", "w/o", "c/w", "r/o", "b/l"),
    whitespace collapsed. Hit spans index into this string."""
    s = _DEID.sub(" ___ ", sentence).lower()
    for rx, repl in _SHORTHAND:
        s = rx.sub(repl, s)
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
    matches = list(_PRE_NEGATION_UNCERTAINTY.finditer(masked))
    strong = [m.span() for m in matches]
    # Passive forms ("X cannot be excluded") speak of a mention before them, active ones
    # ("cannot exclude X", "no new X") of a mention after them.
    passive = [_PASSIVE.search(m.group()) is not None for m in matches]
    pre = [_Cue(a, b, UNCERTAIN, strong=True) for (a, b), p in zip(strong, passive) if not p]
    post = [_Cue(a, b, UNCERTAIN, strong=True) for (a, b), p in zip(strong, passive) if p]
    masked = _blank(masked, strong)
    hedges = _blank(masked, (m.span("hedge") for m in _NEGATED_HEDGE.finditer(masked)))
    pre += [_Cue(*m.span(), NEGATIVE) for m in _NEGATION_PRE.finditer(masked)]
    post += [_Cue(*m.span(), NEGATIVE) for m in _NEGATION_POST.finditer(masked)]
    attributive = {m.start() for m in _ATTRIBUTIVE_HEDGE.finditer(hedges)}
    pre += [
        _Cue(*m.span(), UNCERTAIN, weak=m.start() in attributive)
        for m in _UNCERTAINTY_PRE.finditer(hedges)
    ]
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
    """The value of one mention: the nearest cue before it in its clause decides (an
    attributive hedge yields to a negation before it: "no suspicious opacity"); else the
    nearest cue after it whose subject it is; else its base value. Pre-negation
    uncertainty wins over both: an active form ("cannot exclude", "no new") before the
    mention, a passive one ("cannot be excluded") after it."""
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
        nearest = max(pre, key=lambda c: c.end)
        if nearest.weak and any(c.value == NEGATIVE for c in pre):
            return NEGATIVE
        return nearest.value
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


def _or_uncertain(s: str, hits: list[Hit]) -> list[Hit]:
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
        Hit(h.label, h.regions, h.start, h.end, UNCERTAIN)
        if id(h) in marked and h.value == POSITIVE
        else h
        for h in hits
    ]


@functools.lru_cache(maxsize=65536)
def analyse_sentence(sentence: str) -> tuple[tuple[Hit, ...], frozenset[str]]:
    """All mentions of one sentence with their values, and the labels it implies negative."""
    s = prepare_sentence(sentence)
    clauses = _clauses(s)

    def clause_of(pos: int) -> tuple[int, int]:
        return next((c for c in clauses if c[0] <= pos < c[1]), (pos, len(s)))

    cues = _cues(s)
    hits: list[Hit] = []
    candidates = sorted(
        (
            (m.start(), -m.end(), label, regions, base)
            for label, regions, base, rx in MENTION_TABLE
            for m in rx.finditer(s)
        ),
    )
    vetoed = {
        label: [m.span() for m in rx.finditer(s)] for label, rx in UNMENTION_TABLE.items()
    }
    taken: dict[str, list[tuple[int, int]]] = {}
    for start, neg_end, label, regions, base in candidates:
        end = -neg_end
        if any(a < end and start < b for a, b in vetoed.get(label, [])):
            continue  # an unmention phrase ("pericardial effusion") covers it
        if any(a < end and start < b for a, b in taken.get(label, [])):
            continue  # a longer mention of the same label already covers this one
        taken.setdefault(label, []).append((start, end))
        value = _mention_value(s, (start, end), clause_of(start), base, cues)
        hits.append(Hit(label, regions, start, end, value))
    hits = _or_uncertain(s, hits)
    # CheXpert's aggregation exception: a positive or uncertain "CHF" / "heart failure"
    # also makes Cardiomegaly uncertain.
    hits += [
        Hit("Cardiomegaly", ("heart",), h.start, h.end, UNCERTAIN)
        for h in hits
        if h.label == "Edema" and h.value != NEGATIVE and _HEART_FAILURE.search(s, h.start, h.end)
    ]

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
            hits.append(Hit("Cardiomegaly", ("heart",), *span, value))
        elif kind == "mediastinum":
            hits.append(Hit("Enlarged Cardiomediastinum", ("mediastinum",), *span, value))
        else:
            # The cardiomediastinal silhouette: enlarged or stable speaks of the whole
            # (Enlarged Cardiomediastinum only, as CheXpert); normal clears the heart too.
            both = ("mediastinum", "heart")
            hits.append(Hit("Enlarged Cardiomediastinum", both, *span, value))
            if value == NEGATIVE:
                hits.append(Hit("Cardiomegaly", both, *span, value))

    implied = frozenset().union(*(labels for rx, labels in _IMPLIED_NEGATIVES if rx.search(s)))
    return tuple(sorted(hits, key=lambda h: h.start)), implied


def combine_values(a: float | None, b: float) -> float:
    """CheXpert's aggregation: positive beats uncertain beats negative."""
    return b if a is None or PRIORITY[b] > PRIORITY[a] else a


def _label_text(text: str) -> str:
    """What is labeled: findings + impression when the report has them, as CheXpert labels
    the report body (never the indication, history or comparison), else findings_text."""
    sections = parse_sections(text)
    parts = [sections[k] for k in ("findings", "impression") if k in sections]
    return "\n\n".join(parts) if parts else findings_text(text)


def label_report(text: str, *, hierarchy: bool = True) -> dict[str, float | None]:
    """Label a report with the 14 CheXpert observations: POSITIVE (1.0), NEGATIVE (0.0),
    UNCERTAIN (-1.0) or None (not mentioned), by the CheXpert labeler's rules.

    The labeled text is the findings + impression (or, without them, findings_text()),
    split into sentences; "XXXX" / "___" de-identification marks are opaque words.
    Extract: each sentence is searched for the mention phrases of each observation
    (echo_ray.text.mentions: CheXpert's phrases with synonyms, morphology and
    abbreviations such as ETT, NGT, PICC, ICD, CHF, PTX, PNA; "s/p", "w/", "c/w", "b/l"
    spelled out); a mention overlapping an unmention phrase ("pericardial effusion",
    "calcified nodule") is dropped. Classify, in CheXpert's order: pre-negation
    uncertainty ("cannot exclude", "not excluded", "cannot rule out", "no new X") wins;
    else the nearest cue before the mention in its clause ("no", "without", "free of",
    "negative for", "resolution of", "removal of" / "may", "possible", "suspicious for",
    "versus", "differential", "correlate clinically for", ...), else a cue after it whose
    subject it is ("has resolved", "was removed", "is no longer seen" / "is suspected",
    "is less likely", "may be present"); else POSITIVE. Mentions joined by "or",
    "and/or", "versus" or "/" are uncertain. Decisions:

    - Scopes are clauses (no dependency parse): they end at "but", "however",
      "although", ";", ", with", "which", ", and there", a comma opening "X is ...",
      and a comma before a severity word or "new" ("no pneumothorax, small left
      effusion" asserts the effusion). A list after one negation ("no focal
      consolidation, effusion or pneumothorax") is negated item by item; an attributive
      hedge inside it ("no suspicious opacity") yields to the negation.
    - "likely X" / "most likely X" / "consistent with X" are POSITIVE (CheXpert has no
      "likely" rule); "less likely" and "unlikely" are UNCERTAIN. "No evidence of new X"
      is NEGATIVE ("no evidence of" governs X), "no new X" UNCERTAIN.
    - Temporal words: "resolved", "cleared", "removed", "no longer seen" negate;
      "unchanged", "stable", "persistent", "new", "improved", "worsening", "decreased"
      keep a finding POSITIVE ("no change in X" is not a negation).
    - Congestion / cephalization / vascular prominence are Edema UNCERTAIN, blunted
      costophrenic angles Pleural Effusion UNCERTAIN. A positive or uncertain "CHF" /
      "heart failure" is Edema and also Cardiomegaly UNCERTAIN (CheXpert's aggregation
      rule). "Lesion" alone, calcified nodules and granulomas are not Lung Lesion;
      "volume loss" is Atelectasis, "airspace disease" Lung Opacity.
    - Support devices by name (tubes, lines, catheters, PICC, ETT, NG / OG / Dobhoff,
      pacemaker, ICD / AICD, defibrillator, ports, drains, valves, hardware) and
      sternotomy wires (the synthetic archive's device) are Support Devices; surgical
      clips are not (CheXpert's list has no "clip"), so clips alone leave No Finding
      POSITIVE. A tracheostomy tube is a device only, unlike CheXpert's no_finding list.
    - Heart / mediastinum size statements: enlarged -> POSITIVE, normal / top normal /
      within normal limits -> NEGATIVE, borderline / "normal to mildly enlarged" /
      stable-unchanged -> UNCERTAIN (CheXpert). A normal cardiomediastinal silhouette
      negates both Cardiomegaly and Enlarged Cardiomediastinum; an enlarged one is
      Enlarged Cardiomediastinum only. Without a size attribute "the heart" is no
      mention (CheXpert's positional unmentions, "leads in the heart", in effect).
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
      counting findings outside the 14 (emphysema, granuloma, hernia, scoliosis,
      contusion, pericardial effusion, ..., CheXpert's no_finding list); otherwise None,
      as CheXpert leaves it blank. A blank text gets None everywhere.
    """
    body = _label_text(text)
    if not body.strip():
        return dict.fromkeys(CHEXPERT_LABELS)
    return label_sentences(split_sentences(body), hierarchy=hierarchy)


def label_sentences(sentences: Iterable[str], *, hierarchy: bool) -> dict[str, float | None]:
    """label_report's rules applied to a list of sentences."""
    found: dict[str, float] = {}
    implied: set[str] = set()
    for sentence in sentences:
        hits, negatives = analyse_sentence(sentence)
        for h in hits:
            found[h.label] = combine_values(found.get(h.label), h.value)
        implied |= negatives
    other = found.pop(OTHER, None)
    if hierarchy:
        for parent, children in LABEL_HIERARCHY.items():
            if parent not in found:
                child_values = [found[c] for c in children if found.get(c) in (POSITIVE, UNCERTAIN)]
                if child_values:
                    found[parent] = max(child_values, key=PRIORITY.__getitem__)
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
