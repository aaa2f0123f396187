"""Check that every relative link in README.md and docs/*.md resolves (run by `make lint`).

A link resolves when its file (or folder) exists, relative to the page that has it, and,
for ``#anchor`` links, when the target page has a heading with that GitHub-style slug
(lower case, markup and punctuation other than ``-`` and ``_`` dropped, spaces as ``-``;
a repeated heading gets ``-1``, ``-2``, ...). Absolute URLs (``https:``, ``mailto:``) are
not checked. Links inside code blocks and code spans are not links.

Prints each broken link as ``FILE:LINE: LINK`` and exits 1; exits 0 when all resolve.
Usage: python tools/check_links.py [FILE.md ...] (default: README.md and docs/*.md).
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the target may be in <...>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+[^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HTML_TAG = re.compile(r"<[^>]+>")


def lines_outside_code(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each line outside fenced and indented code blocks."""
    result = []
    fence = ""
    indented = False  # in an indented code block
    previous_blank = True
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = ""
        elif match:
            fence = match.group(1)
        elif line.strip():
            # An indented block starts after a blank line (it cannot interrupt a paragraph).
            deep = line.startswith(("    ", "\t"))
            indented = deep and (indented or previous_blank)
            if not indented:
                result.append((number, line))
        previous_blank = not line.strip() and not fence
    return result


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = HTML_TAG.sub("", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in lines_outside_code(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on ``page`` outside code."""
    found = []
    for number, line in lines_outside_code(page.read_text(encoding="utf-8")):
        prose = CODE_SPAN.sub("", line)
        for match in INLINE_LINK.finditer(prose):
            found.append((number, match.group(1).strip("<>")))
        definition = REFERENCE_DEF.match(prose)
        if definition:
            found.append((number, definition.group(1).strip("<>")))
    return found


def broken(page: Path, target: str) -> bool:
    if SCHEME.match(target) or target.startswith("//"):
        return False  # an absolute URL
    path, _, anchor = target.partition("#")
    resolved = (page.parent / unquote(path)).resolve() if path else page
    if not resolved.exists():
        return True
    if not anchor:
        return False
    if resolved.suffix.lower() != ".md" or not resolved.is_file():
        return True  # an anchor in something that is not a Markdown page
    return unquote(anchor).lower() not in anchors(resolved)


def main(argv: list[str]) -> int:
    pages = [Path(a).resolve() for a in argv]
    if not pages:
        pages = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]
    failures = 0
    for page in pages:
        for number, target in links(page):
            if broken(page, target):
                try:
                    name = page.relative_to(ROOT)
                except ValueError:
                    name = page
                print(f"{name}:{number}: {target}")
                failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
