"""mkdocs hooks (mkdocs.yml, ``hooks:``): EXPERIMENTS.md, included in experiments.md, links its
figures and reports as ``experiments/<run>/report.png``; this adds the repository's experiments/
folder to the site at that path, so the links resolve under ``mkdocs build --strict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
KINDS = {".png", ".md", ".csv"}  # figures, the reports EXPERIMENTS.md links, their tables


def on_files(files: Files, config: Any) -> Files:
    for path in sorted((ROOT / "experiments").rglob("*")):
        if path.is_file() and path.suffix in KINDS:
            src_uri = path.relative_to(ROOT).as_posix()
            files.append(File(src_uri, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
