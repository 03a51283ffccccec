"""The documentation site builds without warnings (``mkdocs build --strict``), and its API
page renders the docstrings: no reST markup left raw on it."""
import html
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mkdocs") is None and not os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "mkdocs")), reason="mkdocs is not installed"),
]

# reST that Markdown leaves as text, searched in the page's visible text.
RAW_REST = {
    "role": re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|math|ref|doc):(?=\S)"),
    "field": re.compile(r":(?:param|type|returns?|rtype|raises?|ivar|cvar|var)\b[^:\n]{0,80}:"),
    "directive": re.compile(r"\.\. [a-z][\w-]*::"),
    "literal-block marker": re.compile(r"\w::(?=\s|$)"),
    "double backticks": re.compile(r"``"),
}
# Math that arithmatex did not pick up: a `$` outside code and outside rendered math.
RENDERED = re.compile(r"<(pre|code)\b.*?</\1>|<(span|div) class=\"arithmatex\">.*?</\2>", re.S)


def visible_text(page, drop=None):
    page = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    if drop is not None:
        page = drop.sub("", page)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def raw_markup(page):
    """``(what, excerpt)`` for each piece of raw reST or unrendered math on an HTML page."""
    found = []
    text = visible_text(page)
    for what, pattern in RAW_REST.items():
        for m in pattern.finditer(text):
            found.append((what, " ".join(text[max(0, m.start() - 60):m.end() + 60].split())))
    bare = visible_text(page, drop=RENDERED)
    for m in re.finditer(r"\$", bare):
        found.append(("unrendered math", " ".join(bare[max(0, m.start() - 60):m.end() + 60].split())))
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("site")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out_dir)],
        cwd=ROOT, capture_output=True, text=True,
    )
    return out, out_dir


def test_mkdocs_build_strict(site):
    out, out_dir = site
    assert out.returncode == 0, out.stdout + out.stderr
    assert (out_dir / "api" / "index.html").exists()


def test_api_page_has_no_raw_rest(site):
    out, out_dir = site
    assert out.returncode == 0, out.stdout + out.stderr
    page = (out_dir / "api" / "index.html").read_text(encoding="utf-8")
    found = raw_markup(page)
    assert not found, f"{len(found)} raw reST / unrendered math on the API page:\n" + "\n".join(
        f"  {what}: ...{excerpt}..." for what, excerpt in found[:40])
    assert 'class="arithmatex"' in page, "no math rendered on the API page"
