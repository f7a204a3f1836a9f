"""README.md and docs/ as a user reads them: every relative link reaches a file (and, with a
#fragment, a heading of that page), and README stays a front door of at most 220 lines."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a link-like string in code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _prose(open(path).read()), flags=re.M)}


def broken_links(path: str) -> list[str]:
    """The relative links of the page at `path` that do not resolve, as 'target (why)'."""
    broken = []
    for target in LINK.findall(_prose(open(path).read())):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: -- not checked offline
            continue
        file, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.endswith(".md") and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading #{fragment})")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    problems = {os.path.relpath(p, ROOT): broken_links(p) for p in _pages()}
    assert not {page: links for page, links in problems.items() if links}


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# Tasks and evaluation\n\n## The `evaluate` command, step 2\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#the-evaluate-command-step-2) [gone](c.md) [bad](b.md#nope) "
                    "[web](https://example.org/x) ![fig](b.md)\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(str(page)) == ["c.md (no such file)", "b.md#nope (no heading #nope)"]


def test_readme_is_a_front_door():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: move detail into docs/"
