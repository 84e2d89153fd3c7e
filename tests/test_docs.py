"""The README stays a front door, and no link in it or in docs/ leads nowhere."""
import re

import pytest

from weibo_senti import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
RESULT_PAGES = sorted((REPO_ROOT / "docs" / "results").glob("*.md"))
STUDIES = sorted(path for path in (REPO_ROOT / "studies").iterdir() if path.is_dir())
LINKED_PAGES = [*PAGES, *RESULT_PAGES, REPO_ROOT / "studies" / "README.md", *(study / "README.md" for study in STUDIES),
                REPO_ROOT / "results" / "human_labels" / "README.md"]
DEPLOYMENT_BENCHMARKS = {"inference.py", "serve_load.py", "score_scale.py", "run.py", "reference.py", "pipeline.py", "gpu.py"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(page):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_fits_in_a_few_screens():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move the detail to docs/"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: page.relative_to(REPO_ROOT).as_posix())
def test_every_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_docs_are_all_linked_from_the_readme():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme]
    assert not unlinked, f"not linked from README.md: {', '.join(unlinked)}"


def test_the_results_index_fits_on_a_screen_or_two_and_links_every_page():
    index = (REPO_ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert index.count("\n") <= 80, "docs/results.md is an index: put the detail on a page of docs/results/"
    assert not [page.name for page in RESULT_PAGES if f"(results/{page.name})" not in index]


def test_bench_holds_deployment_benchmarks_and_each_study_its_folder():
    assert {path.name for path in (REPO_ROOT / "bench").glob("*.py")} - {"__init__.py"} == DEPLOYMENT_BENCHMARKS
    listed = (REPO_ROOT / "studies" / "README.md").read_text(encoding="utf-8")
    for study in STUDIES:
        readme = (study / "README.md").read_text(encoding="utf-8")
        assert "**Question.**" in readme and "**Date.**" in readme, f"{study.name}/README.md: say the question and the date"
        assert f"python studies/{study.name}/{study.name}.py" in readme, f"{study.name}/README.md: give its command"
        assert f"]({study.name}/README.md)" in listed, f"studies/README.md does not list {study.name}"
