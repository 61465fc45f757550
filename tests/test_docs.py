"""The README is the front page and the manual is a MkDocs site (issue 21, req 6): the site builds with
--strict (a broken link or a page missing from the nav fails), the generated references are current."""

import re
import subprocess

from grpolab import config
from grpolab.cli import cli_reference

from conftest import BIN, REPO


def test_the_site_builds_strictly(tmp_path):
    proc = subprocess.run([f"{BIN}/mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": BIN})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "params" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    assert {p for p in pages if p not in nav} == set()


def test_the_generated_references_are_current():
    assert config.params_reference() in (REPO / "docs/reference/params.md").read_text(), "stale: run `make reference`"
    assert cli_reference() in (REPO / "docs/reference/cli.md").read_text(), "stale: run `make reference`"
    assert "None |" not in config.params_reference().replace("`None`", "")  # every field has a description


def test_the_readme_is_a_front_page_whose_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to {target}, which does not exist"
