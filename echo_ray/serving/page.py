"""The review page served at `GET /`: one self-contained HTML file (`review_page.html`,
inline CSS and JavaScript, no external asset) filled in with the server's settings.

The page calls `POST /v1/reports` (streamed, with preview images) and
`POST /v1/reports/signoff`; it keeps nothing but the API key (in the tab's
sessionStorage). Plain Python: no ray, no torch.
"""

from __future__ import annotations

import json
from importlib import resources

PAGE_FILE = "review_page.html"


def _script_literal(value: object) -> str:
    """`value` as a JavaScript literal that is safe inside a <script> element: JSON, with
    "<", ">" and "&" escaped so that no value can close the element."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_review_page(*, modes: list[str], auth: bool, root_path: str = "") -> str:
    """The review page's HTML for one server.

    Args:
        modes: the decoding modes the server allows, its default first; the page offers
            "server default (<modes[0]>)" and then the others.
        auth: whether the `/v1` routes need a bearer key (the page then shows the key
            field); False only for a server started with `--insecure` and no keys.
        root_path: the app's route prefix (e.g. "/dev"; "" at the root): the page calls
            the API under it.

    Raises:
        ValueError: `modes` is empty (the page has no default to name).
    """
    if not modes:
        raise ValueError("the review page needs at least one decoding mode (the default)")
    html = resources.files("echo_ray.serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    html = html.replace("{{MODES}}", _script_literal(list(modes)))
    html = html.replace("{{ROOT}}", _script_literal(root_path.rstrip("/")))
    return html.replace("{{AUTH}}", "true" if auth else "false")
