"""The docs stand alone: citations a reader can follow, and links and paths that exist.

A reader of the repository has the papers and the upstream code (PKU-Alignment/safe-rlhf), not our
notes or issue tracker: code, configs, docs, experiments, notebooks and tests cite a paper (with its
equation or section) or an upstream file, never "spec §N" or "issue N". Every relative link in
README.md and docs/*.md, every repository path they name and every `test_x.py::test_y` they point
to must exist.
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ["jaxalign", "configs", "docs", "experiments", "colab", "tests"]
SCANNED_FILES = ["README.md", "Makefile", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".ipynb", ".toml", ".txt", ".cfg"}
TOP_DIRS = ("jaxalign", "configs", "docs", "experiments", "tests", "colab")

UNFOLLOWABLE = [  # this file names them, so it is not scanned
    (re.compile(r"spec (?:§|section)", re.I), "a spec section"),
    (re.compile(r"\bissues?[ \t-]*#?\d+", re.I), "an issue number (cite a URL for an upstream issue)"),
    (re.compile(r"DESIGN\.md|/work/shared|safe_rlhf_spec"), "the project's own notes"),
]


def _scanned_files():
    for name in SCANNED_FILES:
        if (REPO / name).is_file():
            yield REPO / name
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if (path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts
                    and path != pathlib.Path(__file__).resolve()):
                yield path


def unfollowable_citations(files) -> list[str]:
    """'path:line: what' for every spec-section, issue-number or own-notes citation in `files`."""
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern, what in UNFOLLOWABLE:
                for match in pattern.finditer(line):
                    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
                    found.append(f"{where}:{number}: {what}: {match.group(0)!r}")
    return found


def test_code_and_docs_cite_papers_and_upstream_files_not_our_notes():
    found = unfollowable_citations(_scanned_files())
    assert not found, "citations a reader cannot follow:\n" + "\n".join(found)


def test_the_citation_check_finds_each_kind(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Loss (spec §4.2).\n\nSee Issue 12 and issue-#13; DESIGN.md."""\n'
                   "# upstream: https://github.com/PKU-Alignment/safe-rlhf/issues/181 (a URL is fine)\n")
    found = unfollowable_citations([bad])
    assert [f.split(": ")[1] for f in found] == [
        "a spec section", "an issue number (cite a URL for an upstream issue)",
        "an issue number (cite a URL for an upstream issue)", "the project's own notes"]


def _docs():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "configs" / "README.md"]


_LINK = re.compile(r"\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w/.-])((?:%s)/[^\s`'\")\]|;:]*)" % "|".join(TOP_DIRS))
_TEST_REF = re.compile(r"\b(\w+\.py)::(\w+)")


def _as_glob(path: str) -> list[str]:
    """'configs/{a,b}_tiny.py' -> ['configs/a_tiny.py', 'configs/b_tiny.py'] (each must exist);
    '<name>' -> '*' (something must match)."""
    path = re.sub(r"<[^>]*>", "*", path)
    brace = re.search(r"\{([^}]*)\}", path)
    if brace is None:
        return [path]
    return [g for alt in brace.group(1).split(",") for g in _as_glob(path[:brace.start()] + alt + path[brace.end():])]


def _is_placeholder(path: str) -> bool:
    """A file the reader writes (configs/my_x.py) or a metavariable (configs/X.py, colab/NAME)."""
    stem = pathlib.PurePosixPath(path).stem
    return stem.startswith("my_") or (stem.isupper() and stem.isalpha())


def missing_references(doc: pathlib.Path) -> list[str]:
    """'doc:line: target' for each relative link, repository path or test reference of `doc` that
    does not exist. Links resolve against the doc's folder, paths against the repository root."""
    missing = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for match in _LINK.finditer(line):
            target = match.group(1).split("#")[0]
            if not target or re.match(r"[a-z]+:", target):
                continue  # an anchor, http(s):, mailto:
            if not (doc.parent / target).exists():
                missing.append(f"{doc.name}:{number}: link {target}")
        for match in _PATH.finditer(line):
            path = match.group(1).rstrip(".,")
            if _is_placeholder(path):
                continue
            if not all(any(REPO.glob(g)) if "*" in g else (REPO / g).exists() for g in _as_glob(path)):
                missing.append(f"{doc.name}:{number}: path {path}")
        for match in _TEST_REF.finditer(line):
            file, name = match.groups()
            defined = [p for top in ("tests", "jaxalign", "experiments") for p in (REPO / top).rglob(file)
                       if re.search(rf"^\s*(?:def|class) {name}\b", p.read_text(), re.M)]
            if not defined:
                missing.append(f"{doc.name}:{number}: {file}::{name}")
    return missing


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_paths_and_test_references_in_the_docs_exist(doc):
    missing = missing_references(doc)
    assert not missing, "\n".join(missing)


def test_the_reference_check_finds_each_kind(tmp_path):
    doc = tmp_path / "page.md"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "plot.png").write_bytes(b"")
    doc.write_text(
        "![ok](images/plot.png) [gone](images/gone.png) [web](https://example.com) [anchor](#top)\n"
        "`configs/{sft,reward}_tiny.py` `configs/<name>_tiny.py` `configs/my_run.py` `configs/X.py`\n"
        "`configs/{sft,nosuch}_tiny.py` `jaxalign/nosuch.py`, and jaxalign/stages/rl.py.\n"
        "`test_docs.py::test_the_reference_check_finds_each_kind` `test_docs.py::test_gone`\n")
    assert missing_references(doc) == [
        "page.md:1: link images/gone.png",
        "page.md:3: path configs/{sft,nosuch}_tiny.py",
        "page.md:3: path jaxalign/nosuch.py",
        "page.md:4: test_docs.py::test_gone",
    ]
