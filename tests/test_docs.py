"""The docs stay in step with the code: the configuration page is the rendering of
`Settings`, every metric the code defines is documented, and relative links resolve."""

import re
from pathlib import Path

from services import metrics
from services.config import setting_fields
from services.config_docs import COMMAND, render
from services.events import INVALID_REASONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
ALL_DOCS = {p: p.read_text() for p in sorted(DOCS.glob("*.md"))}


def test_configuration_page_is_the_rendering_of_settings():
    page = (DOCS / "configuration.md").read_text()
    assert page == render(), (
        f"docs/configuration.md is out of step with services/config.py; regenerate it with "
        f"`{COMMAND}` (or `make docs`) and commit the result")


def test_every_setting_is_in_the_configuration_page():
    page = (DOCS / "configuration.md").read_text()
    missing = [f.name for _, f in setting_fields() if f"`{f.name}`" not in page]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_every_metric_is_in_the_docs():
    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r'"(promptrec_[a-z_]+)"', source))
    assert len(names) >= 10
    text = "\n".join(ALL_DOCS.values())
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"metrics missing from docs/: {missing}"


def test_every_dead_letter_reason_is_in_the_streaming_page():
    page = (DOCS / "streaming.md").read_text()
    missing = [r for r in INVALID_REASONS if f"`{r}`" not in page]
    assert not missing, f"dead-letter reasons missing from docs/streaming.md: {missing}"


def test_readme_stays_short():
    lines = README.count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_readme_links_every_page_of_docs():
    missing = [p.name for p in ALL_DOCS if f"(docs/{p.name}" not in README]
    assert not missing, f"README.md does not link: {missing}"


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces -> -."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    broken = []
    for path, text in [(ROOT / "README.md", README), *ALL_DOCS.items()]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if not linked.exists() or (anchor and linked.suffix == ".md"
                                       and anchor not in anchors(linked.read_text())):
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken relative links: {broken}"


def test_figures_name_their_result_files():
    """Every bench/results file the benchmarks page quotes exists."""
    page = (DOCS / "benchmarks.md").read_text()
    named = set(re.findall(r"bench/results/([\w.-]+\.json)", page))
    assert named, "docs/benchmarks.md names no result file"
    missing = sorted(n for n in named if not (ROOT / "bench" / "results" / n).exists())
    assert not missing, f"docs/benchmarks.md quotes missing result files: {missing}"
