"""The docs point at things that exist: links, anchors, modules and config files.

README.md and docs/*.md are read as text (no JAX, no subprocess): every relative link
must name a file of the checkout, every `#anchor` a heading of its target (GitHub's
slugs), every `python -m alexnet_jax.X` a module under src/, and every `configs/X.py`
a config. A broken one is reported with its file and line, so a renamed heading or a
moved module shows up here instead of as a dead link for a reader.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

# [text](target) and ![alt](target), with an optional "title"; inline code is blanked out first.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# python -m alexnet_jax.a.b, not followed by more of a name (".<tool>" or ".*" are placeholders).
MODULE_COMMAND = re.compile(r"python(?:3(?:\.\d+)?)?\s+-m\s+(alexnet_jax(?:\.[A-Za-z_]\w*)*)(?![.\w<*])")
CONFIG_FILE = re.compile(r"(?<![\w/.-])configs/([\w-]+)\.py\b")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # NAME, TOOL: the docs' placeholders, not names


def numbered_lines(path: Path, *, skip_code: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) of a Markdown file; with skip_code, the lines of fenced code blocks are left out."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            continue
        if fence is not None:
            if opening and closes(fence, opening.group(1), line):
                fence = None
            if not skip_code:
                yield number, line
            continue
        yield number, line


def closes(fence: str, marker: str, line: str) -> bool:
    """A fence closes with the same character, at least as many, and nothing after them."""
    return marker[0] == fence[0] and len(marker) >= len(fence) and not line.strip().strip(fence[0])


def heading_text(raw: str) -> str:
    """The text GitHub renders for a heading's Markdown: links become their text, code its content."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = INLINE_CODE.sub(lambda match: match.group(2), text)
    return re.sub(r"<[^>]+>", "", text)


def github_slug(text: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than '-' and '_' dropped, spaces -> '-'."""
    kept = []
    for char in heading_text(text).strip().lower():
        category = unicodedata.category(char)
        if char in "-_" or category[0] in "LN" or category == "Mn":
            kept.append(char)
        elif char == " ":
            kept.append("-")
    return "".join(kept)


def anchors(path: Path) -> set[str]:
    """Every anchor a file offers: its headings' slugs (a repeated slug gets -1, -2, ...) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in numbered_lines(path, skip_code=True):
        found.update(HTML_ANCHOR.findall(line))
        heading = ATX_HEADING.match(line)
        if not heading:
            continue
        slug = github_slug(heading.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link and image outside code (inline or reference-style)."""
    for number, line in numbered_lines(path, skip_code=True):
        prose = INLINE_CODE.sub(lambda match: " " * len(match.group(0)), line)
        for match in INLINE_LINK.finditer(prose):
            yield number, match.group(1)
        definition = REFERENCE_DEFINITION.match(prose)
        if definition:
            yield number, definition.group(1)


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:, ...


def broken_link(source: Path, target: str, anchor_cache: dict[Path, set[str]]) -> str | None:
    """What is wrong with one link of `source`, or None when its file and anchor exist."""
    if is_external(target):
        return None
    path_part, _, anchor = target.partition("#")
    destination = (source.parent / unquote(path_part)).resolve() if path_part else source
    if not destination.exists():
        return f"link to {target!r}: {_shown(destination)} does not exist"
    if not anchor or destination.suffix.lower() != ".md" or destination.is_dir():
        return None
    if destination not in anchor_cache:
        anchor_cache[destination] = anchors(destination)
    if unquote(anchor) not in anchor_cache[destination]:
        where = "this file" if destination == source else _shown(destination)
        return f"link to {target!r}: no heading in {where} has the anchor #{anchor}"
    return None


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def link_problems(path: Path) -> list[str]:
    anchor_cache: dict[Path, set[str]] = {}
    problems = []
    for number, target in links(path):
        problem = broken_link(path, target, anchor_cache)
        if problem:
            problems.append(f"{_shown(path)}:{number}: {problem}")
    return problems


def module_exists(dotted: str) -> bool:
    """A `python -m` target under src/: a module file, or a package with a __main__.py."""
    base = REPO / "src" / Path(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def command_problems(path: Path) -> list[str]:
    """Modules run with python -m and configs/*.py files named anywhere in the file, code blocks included."""
    problems = []
    where = path.relative_to(REPO)
    for number, line in numbered_lines(path, skip_code=False):
        for dotted in MODULE_COMMAND.findall(line):
            if not PLACEHOLDER.match(dotted.rpartition(".")[2]) and not module_exists(dotted):
                problems.append(f"{where}:{number}: `python -m {dotted}`: no src/{dotted.replace('.', '/')}.py")
        for name in CONFIG_FILE.findall(line):
            if not PLACEHOLDER.match(name) and not (REPO / "configs" / f"{name}.py").is_file():
                problems.append(f"{where}:{number}: configs/{name}.py does not exist")
    return problems


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO)) for path in paths]


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_every_relative_link_and_anchor_resolves(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_every_module_and_config_named_exists(path):
    problems = command_problems(path)
    assert not problems, "missing modules or configs:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md:{len(lines)}: the README has {len(lines)} lines, more than {README_MAX_LINES}; "
        "move detail into docs/"
    )


def test_slugs_follow_github_for_punctuation_code_links_and_repeats(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Packed 256x256 data: decode-free input\n"
        "## The paper's input scale and dropout\n"
        "## WORKDIR/config.json\n"
        "## The GPU benchmark: `bench/gpu.sh`\n"
        "## See [data](data.md#x) for_more\n"
        "## Tests\n## Tests\n## Tests\n"
        "```\n# not a heading\n```\n"
    )
    assert anchors(page) == {
        "packed-256x256-data-decode-free-input",
        "the-papers-input-scale-and-dropout",
        "workdirconfigjson",
        "the-gpu-benchmark-benchgpush",
        "see-data-for_more",
        "tests",
        "tests-1",
        "tests-2",
    }


def test_links_in_code_blocks_and_inline_code_are_not_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```\n[a](missing.md)\n```\n`[b](missing.md)` and [c](https://example.com/x#y)\n")
    assert list(links(page)) == [(4, "https://example.com/x#y")]
    assert link_problems(page) == []
