"""The review page on a real model: `echo-ray serve` on the quickstart's student, one test
study with a small effusion and a central line (the case issue 17 was filed for), the page
driven in headless Chromium, a screenshot of the draft.

    .venv/bin/python docs/review_page/quickstart_screenshot.py [QUICKSTART] [OUT_PNG]

(defaults: quickstart, docs/review_page/quickstart_student_draft.png; needs `make
quickstart` first and Debian's chromium). The server is started on a loopback port with a
throwaway key and stopped at the end.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

KEY, PORT = "screenshot-key", 8765


def main() -> None:
    qs = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart").resolve()
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/review_page/quickstart_student_draft.png"
    study = next(
        t for t in map(json.loads, (qs / "archive" / "ground_truth.jsonl").open())
        if t["split"] == "test"
        and {"Pleural Effusion", "Support Devices"} <= {f["label"] for f in t["findings"]}
    )
    files = sorted(qs.glob(f"archive/files/p*/p{study['subject_id']}/s{study['study_id']}/*.dcm"))
    print("study", study["study_id"], [f"{f['label']} ({f['grade']})" for f in study["findings"]])
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "echo-ray"), "serve", "--checkpoint",
         str(qs / "runs" / "dcd"), "--port", str(PORT)],
        env={**os.environ, "ECHO_RAY_API_KEYS": KEY}, start_new_session=True,
    )
    try:
        for _ in range(150):
            try:
                if requests.get(f"http://127.0.0.1:{PORT}/readyz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{PORT}/")
            page.fill("#key", KEY)
            page.set_input_files("#file", [str(f) for f in files])
            page.click("#submit")
            page.wait_for_function("(() => { const s = document.getElementById('status')"
                                   ".textContent; return s && !s.startsWith('Writing'); })()",
                                   timeout=90_000)
            page.screenshot(path=out, full_page=True)
            print(page.inner_text("#status"))
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print("wrote", out)


if __name__ == "__main__":
    main()
