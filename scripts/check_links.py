#!/usr/bin/env python3
"""Checks every relative link and #anchor in the book (docs/src/**/*.md), README.md,
ARCHITECTURE.md and BENCHMARKS.md: the file it names exists (relative to the page, as
GitHub and mdBook resolve it) and the anchor matches a heading of the target page.

Anchors are heading slugs as GitHub and mdBook make them (lower case; letters, digits,
`-` and `_` kept; spaces to `-`; everything else dropped; a repeated heading gets
`-1`, `-2`, ...), plus explicit `<a id=...>`/`<a name=...>`. Links to http(s), mailto
and other schemes are not fetched. Exits 1 listing every broken link.

    python3 scripts/check_links.py            # from anywhere
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs/src").rglob("*.md")) + [
    ROOT / "README.md",
    ROOT / "ARCHITECTURE.md",
    ROOT / "BENCHMARKS.md",
]

FENCE = re.compile(r"^(```|~~~)")
# [text](target) and [text](target "title"); images too. Not inside `code`.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_HREF = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text):
    """The lines outside fenced code blocks, with their line numbers."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line.lstrip())
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif line.lstrip().startswith(fenced):
                fenced = None
            continue
        if fenced is None:
            yield number, line


def slug(heading):
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    if path not in _anchors:
        found = set()
        seen = {}
        text = path.read_text(encoding="utf-8")
        for _, line in prose_lines(text):
            heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if heading:
                base = slug(heading.group(1))
                count = seen.get(base, 0)
                seen[base] = count + 1
                found.add(base if count == 0 else f"{base}-{count}")
            found.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", line))
        _anchors[path] = found
    return _anchors[path]


def strip_code_spans(line):
    return re.sub(r"(`+)(?:(?!\1).)+\1", "", line)


def check(page):
    broken = []
    text = page.read_text(encoding="utf-8")
    for number, line in prose_lines(text):
        line = strip_code_spans(line)
        targets = INLINE_LINK.findall(line) + HTML_HREF.findall(line)
        ref = REF_DEF.match(line)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if SCHEME.match(target) or target.startswith("//"):
                continue
            file_part, _, anchor = target.partition("#")
            destination = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not destination.exists():
                broken.append(f"{where}: no such file")
                continue
            if anchor:
                if destination.is_dir() or destination.suffix != ".md":
                    broken.append(f"{where}: an anchor into a file that is not a page")
                elif anchor not in anchors(destination):
                    broken.append(f"{where}: no heading with the anchor #{anchor}")
    return broken


def main():
    broken = [problem for page in PAGES for problem in check(page)]
    for problem in broken:
        print(problem, file=sys.stderr)
    if broken:
        print(f"{len(broken)} broken link(s)", file=sys.stderr)
        return 1
    print(f"links: {len(PAGES)} pages checked, no broken link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
