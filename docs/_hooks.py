"""mkdocs hooks (mkdocs.yml, ``hooks:``).

EXPERIMENTS.md, included in experiments.md, links its figures and reports as
``experiments/<run>/report.png``: ``on_files`` adds the repository's experiments/ folder to the site
at that path, so the links resolve under ``mkdocs build --strict``. The docstrings cross-reference
in Sphinx's roles (``:class:`~localsgd.LocalSGD```), which mkdocstrings leaves as text:
``on_page_content`` drops the role, keeping the name as code (the last part for ``~``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
KINDS = {".png", ".md", ".csv"}  # figures, the reports EXPERIMENTS.md links, their tables
ROLE = re.compile(r":(?:class|mod|func|meth|data|attr|exc):<code>(~?)([\w.]+)</code>")


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((ROOT / "experiments").rglob("*")):
        if path.is_file() and path.suffix in KINDS:
            src_uri = path.relative_to(ROOT).as_posix()
            files.append(File(src_uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)
