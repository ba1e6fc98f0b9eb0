"""README.md and docs/*.md stay true to the tree: every relative link names an existing file (and,
with #anchor, an existing heading of it), and every command-line flag given to one of our scripts
in a command (python stages/..., python benchmarks/..., python -m pipeline..., scripts/...) is one
that script's argparse (or shell script) accepts. A renamed file, heading or flag fails here.
Flags are read from the add_argument calls of the script and the project code it imports, not by
running every --help (fast)."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from tests.test_dvc_deps import project_code

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # a shell comment is no heading
    headings = re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]  # http(s):, mailto: are not ours to check


def code_pieces(page: Path) -> list[str]:
    """The shell a page shows: fenced blocks and indented blocks line by line (a trailing
    backslash joins the next line), and inline code spans (which may wrap across lines)."""
    text = page.read_text()
    pieces = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        pieces += block.replace("\\\n", " ").splitlines()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    indented = re.findall(r"(?:^(?: {4}|\t).*\n?)+", text, flags=re.M)
    for block in indented:
        pieces += block.replace("\\\n", " ").splitlines()
    text = re.sub(r"(?:^(?: {4}|\t)(?![-*] ).*\n?)+", "", text, flags=re.M)
    pieces += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text)]
    return pieces


SCRIPT = re.compile(r"(?:^|[\s(])(?:-m (pipeline(?:\.\w+)+)|((?:stages|benchmarks|examples|scripts)/[\w/.-]+\.(?:py|sh)))")


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(script path, flags given to it) for every command of a page that runs one of our scripts."""
    found = []
    for piece in code_pieces(page):
        for command in re.split(r"\s(?:&&|\|\||;|\|)\s|\s#\s", piece):
            match = SCRIPT.search(command)
            if match is None:
                continue
            script = match.group(2) or match.group(1).replace(".", "/") + ".py"
            flags = re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", command[match.end() :])
            found.append((script, flags))
    return found


@functools.cache
def flags_defined_in(path: Path) -> frozenset[str]:
    """The option strings of the add_argument calls in one file."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return frozenset(flags)


@functools.cache
def accepted_flags(script: Path) -> frozenset[str]:
    """The option strings of every add_argument call in ``script`` and the project code it
    imports (a stage's --run comes from pipeline/commands.py); for a shell script, the --flags it names."""
    if script.suffix == ".sh":
        return frozenset(re.findall(r"--[A-Za-z][\w-]*", script.read_text()))
    files = {script} | {ROOT / f for f in project_code(script)}
    return frozenset().union(*(flags_defined_in(path) for path in files))


def test_every_docs_page_is_linked_from_the_readme_and_says_what_it_is_for():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"{page_id(page)} is not linked from README.md"
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[2].startswith("Use this page to "), f"{page_id(page)} opens with its title, then 'Use this page to ...'"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_name_existing_files_and_headings(page):
    assert relative_links(ROOT / "README.md"), "no link found: the link pattern is broken"
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page_id(page)}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(file), f"{page_id(page)}: link to {target}: no heading with that anchor in {file.name}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_flags_in_commands_exist_in_the_scripts_they_are_given_to(page):
    for script, flags in commands(page):
        path = ROOT / script
        assert path.is_file(), f"{page_id(page)}: command runs {script}: no such file"
        unknown = sorted(set(flags) - accepted_flags(path))
        assert not unknown, f"{page_id(page)}: {script} is given {unknown}, which it does not accept"


def test_commands_are_found_with_their_flags():
    """The extraction itself: the pages show commands with flags, and a renamed flag is caught."""
    all_commands = [c for page in PAGES for c in commands(page)]
    assert ("stages/recommend.py", ["--run", "--histories", "--out"]) in all_commands
    assert any(script == "benchmarks/synthetic.py" and "--items" in flags for script, flags in all_commands)
    assert any(script == "pipeline/recommend.py" and "--user" in flags for script, flags in all_commands)
    assert "--items" in accepted_flags(ROOT / "benchmarks/synthetic.py")
    assert "--run" in accepted_flags(ROOT / "stages/score.py")
    assert "--no-such-flag" not in accepted_flags(ROOT / "stages/score.py")
