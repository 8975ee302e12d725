"""MIMIC-CXR report structure: parse_sections (create_section_files.py's header rules;
addenda kept apart; "___" left as text), findings_text (the part of a report that describes
the image) and split_sentences. Plain Python.
"""

from __future__ import annotations

import re

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
KNOWN_HEADER = "|".join(
    re.escape(k).replace(r"\ ", r"\s+") for k in sorted(_SECTION_ALIASES, key=len, reverse=True)
)
_HEADER_RE = re.compile(rf"(?i)(?<![\w(])(?P<name>{KNOWN_HEADER})[ \t]*(?P<colon>:)?")
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
LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
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
        s = LIST_MARKER.sub("", s.strip()).strip()
        if re.search(r"[A-Za-z]", s):
            out.append(s)
    return out


def sentence_spans(text: str) -> list[tuple[str, str, int, int]]:
    """The sentences of a report with where they are: (section, sentence, start, end).

    `section` is the key `parse_sections` gives the sentence's section ("findings",
    "impression", ...); text before the first header, or a report without headers, counts
    as "findings" (as a report dict's `findings` falls back to it). Sentences are
    `split_sentences`' (whitespace normalised, list markers dropped); `text[start:end]` is
    the stretch of `text` each one was read from. Header words belong to no sentence.
    """
    headers = _headers(text)
    bodies = []  # (key, start, end) of each section body
    first = headers[0][0] if headers else len(text)
    bodies.append(("findings", 0, first))
    for i, (_, end, key) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        bodies.append((key or "findings", end, stop))
    spans = []
    for key, lo, hi in bodies:
        cursor = lo
        for sentence in split_sentences(text[lo:hi]):
            pattern = r"\s+".join(re.escape(word) for word in sentence.split())
            m = re.compile(pattern).search(text, cursor, hi)
            if m is None:  # cannot happen for split_sentences' output; never guess a span
                continue
            spans.append((key, sentence, m.start(), m.end()))
            cursor = m.end()
    return spans
