"""The documentation site: `mkdocs build --strict` (a broken link, anchor or nav entry fails), the configuration
reference generated from pipeline/config.py listing every field of RunConfig, and the README's links into docs/."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.conftest import REPO


def _build(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = _build(REPO, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, description) of every field of `model`, recursively; `[]` marks the items of a list of models."""
    out = []
    for name, info in model.model_fields.items():
        path = prefix + name
        out.append((path, info.description or ""))
        annotation, is_model = info.annotation, lambda a: isinstance(a, type) and issubclass(a, BaseModel)
        if typing.get_origin(annotation) is list:  # list[JudgeConfig]: its items' fields
            out += [f for item in typing.get_args(annotation) if is_model(item) for f in _fields(item, path + "[].")]
        else:  # a section, or a section that may be empty (X | None)
            out += [f for a in (annotation, *typing.get_args(annotation)) if is_model(a) for f in _fields(a, path + ".")]
    return out


def _text(cell: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", cell)).split())


def test_reference_lists_every_field_of_runconfig_with_its_description(site):
    from pipeline.config import RunConfig

    page = (site / "reference" / "configuration" / "index.html").read_text()
    rows = {m.group(1): [_text(c) for c in m.groups()[1:]]
            for m in re.finditer(r"<tr>\s*<td><code>([^<]+)</code></td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>",
                                 page, flags=re.DOTALL)}  # fmt: skip
    fields = _fields(RunConfig)
    assert len(fields) > 150  # every section, the judges' fields under label.judges[] and eval.judges[]
    missing = [path for path, _ in fields if path not in rows]
    assert not missing, f"the configuration reference lacks {missing}"
    for path, description in fields:
        _, _, shown = rows[path]
        assert shown.startswith(" ".join(description.replace("`", "").split())), path
    assert rows["rounds"][:2] == ["int", "2"]  # type and default columns
    assert rows["train.loss"][0] == '"dpo" | "ipo" | "ipo_soft" | "slic" | "irepo" | "sr_dpo" | "sr_ipo"'
    assert rows["log.report_to"][1] == "[]" and rows["data.prompts.path"][1] == "required"


def test_every_page_of_docs_is_in_the_site(site):
    pages = sorted(p.relative_to(REPO / "docs").with_suffix("") for p in (REPO / "docs").rglob("*.md"))
    built = [p for p in pages if (site / p / "index.html").is_file() or (p.name == "index" and (site / "index.html").is_file())]
    assert built == pages


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [a page](no-such-page.md) and [an anchor](concepts.md#no-such-heading).\n")
    proc = _build(tmp_path, tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr and "no-such-heading" in proc.stderr  # strict on pages and anchors


def test_readme_is_one_screen_and_links_into_the_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert "docs/getting-started.md" in links and "docs/reference/configuration.md" in links
    assert [link for link in links if not (REPO / link).exists()] == []
