"""What a library ships besides code: its license, changelog, citation, design document, and an
options page (docs/reference/options.md) whose argument table is the strategy's signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml

from localsgd import LocalSGDStrategy

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_PAGE = ROOT / "docs" / "reference" / "options.md"  # the argument table moved here from README


def _argument_table() -> list[str]:
    text = OPTIONS_PAGE.read_text()
    section = text.split("## `LocalSGDStrategy` arguments (keyword-only)", 1)[1].split("\n\n", 2)[1]
    names = []
    for row in section.splitlines()[2:]:  # after the header and the |---| line
        first_cell = row.split("|")[1]
        names += re.findall(r"`([a-z_0-9]+)`", first_cell)
    return names


def test_options_page_argument_table_is_the_strategys_signature() -> None:
    params = [
        name
        for name, p in inspect.signature(LocalSGDStrategy.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    table = _argument_table()
    assert sorted(table) == sorted(params), {
        "missing from the options page": sorted(set(params) - set(table)),
        "not arguments": sorted(set(table) - set(params)),
    }


def test_license_changelog_citation_and_design_document_exist() -> None:
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert citation["title"] and citation["authors"]
    design = (ROOT / "docs" / "design.md").read_text()
    assert "## The code" in design and "## Mistakes this library is built to avoid" in design
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md" in readme and "../shared" not in readme
    assert "## Citing" in readme and "CITATION.cff" in readme


def test_benchmarks_md_covers_every_benchmark() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    for script in ("bench/link.py", "bench/averaging.py", "bench/simulate.py", "bench/gpu_check.sh"):
        assert script in text, script
    assert "BENCHMARKS.md" in (ROOT / "README.md").read_text()


def test_each_options_row_names_every_option_its_rules_exclude() -> None:
    """A row's 'Not with ...' is what the rules say (the fault_tolerance row once left out
    h1_sync="gradients", which its own rule refuses)."""
    from localsgd.core.options import RULES

    section = OPTIONS_PAGE.read_text().split("## `LocalSGDStrategy` arguments (keyword-only)", 1)[1]
    section = section.split("\n\n", 2)[1]  # the argument table, as _argument_table reads it
    rows = {
        re.findall(r"`([a-z_0-9]+)`", row.split("|")[1])[0]: row
        for row in section.splitlines()
        if row[:3] == "| `"
    }
    for name in ("fault_tolerance", "sync_delay", "num_fragments"):
        others = {o for rule in RULES if name in rule.options for o in rule.options if o != name}
        assert others, name
        missing = [o for o in others if f"`{o}" not in rows[name]]
        assert not missing, (name, missing)
