"""The documentation keeps up with the code: every config key the daemon knows is documented in
docs/configuration.md and in config.toml, the README stays short and its commands are CI's, and
every page under docs/ is in the site's nav. Text only: no daemon, no mkdocs (.ci/run builds the
site with `mkdocs build --strict`, which checks links and anchors)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from daemon import config

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README_MAX_LINES = 200
# A row of a key table: "| `section.key` | default | meaning |".
KEY_ROW = re.compile(r"^\| `([a-z_]+\.[a-z_]+)` \|", re.MULTILINE)


def declared_keys() -> dict[str, Any]:
    """Every key the daemon knows, as "section.key" -> its default, from its declaration (config.KEYS)."""
    return {key.name: key.default for key in config.KEYS}


def documented_keys(text: str) -> list[str]:
    """The keys that head a row of a key table in `text`, in order."""
    return KEY_ROW.findall(text)


def test_every_config_key_has_its_row_in_the_configuration_page() -> None:
    rows = documented_keys((DOCS / "configuration.md").read_text())
    missing = sorted(set(declared_keys()) - set(rows))
    assert not missing, f"docs/configuration.md has no '| `key` |' row for {missing}"
    unknown = sorted(set(rows) - set(declared_keys()))
    assert not unknown, f"docs/configuration.md documents keys the daemon does not know: {unknown}"
    twice = sorted({key for key in rows if rows.count(key) > 1})
    assert not twice, f"docs/configuration.md documents {twice} more than once"


def test_config_toml_sets_every_key_to_its_default_with_a_comment() -> None:
    text = (ROOT / "config.toml").read_text()
    document = tomllib.loads(text)
    shipped = {f"{section}.{key}": value for section, keys in document.items() for key, value in keys.items()}
    declared = declared_keys()
    assert sorted(shipped) == sorted(declared), "config.toml and config.DEFAULTS name different keys"
    # The shipped file sets the embedded model and a default database: both are the defaults too.
    different = {key: (shipped[key], declared[key]) for key in declared if shipped[key] != declared[key]}
    assert not different, f"config.toml shows values that are not the defaults: {different}"
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[] ")
        elif re.match(r"^[a-z_]+ =", line):
            assert "#" in line, f"{section}.{line.split()[0]} has no comment in config.toml"


def test_config_toml_comments_begin_with_the_declared_doc_lines() -> None:
    """The first line of each key's comment in config.toml is its declaration's doc line."""
    comments, section = {}, ""
    for line in (ROOT / "config.toml").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[] ")
        elif match := re.match(r"^([a-z_]+) = .*?\s+# (.*)$", line):
            comments[f"{section}.{match[1]}"] = match[2]
    wrong = {
        key.name: (comments.get(key.name), key.doc)
        for key in config.KEYS
        if comments.get(key.name, "").rstrip(";:,. ") != key.doc
    }
    assert not wrong, f"config.toml's comment (first line) differs from the declared doc line: {wrong}"


def test_the_configuration_page_gives_each_key_its_declared_reload_class() -> None:
    rows = re.findall(
        r"^\| `([a-z_]+\.[a-z_]+)` \| [^|]* \| ([a-z]+) \|", (DOCS / "configuration.md").read_text(), re.MULTILINE
    )
    assert len(rows) == len(config.KEYS), "a key's row has no reload column (| key | default | reload | meaning |)"
    wrong = {
        name: (cell, config.BY_NAME[name].reload.value)
        for name, cell in rows
        if cell != config.BY_NAME[name].reload.value
    }
    assert not wrong, f"docs/configuration.md's reload column differs from the declarations: {wrong}"


def test_readme_is_short_and_its_two_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    shell_lines = [line for block in re.findall(r"```sh\n(.*?)```", readme, re.DOTALL) for line in block.splitlines()]
    assert "bash .ci/setup && .venv/bin/inferd run" in shell_lines
    assert "bash .ci/run" in shell_lines
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "\nbash .ci/setup\n" in ci_run, ".ci/run no longer starts with the README's setup command"
    assert re.search(r"^\.venv/bin/python -m pytest", ci_run, re.MULTILINE)
    assert re.search(r"mkdocs build --strict", ci_run)
    assert (ROOT / ".ci" / "setup").read_text().count("-e '.[test,onnxruntime,ray,docs,int8]'") == 1


def test_readme_links_into_docs_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links to no page of docs/"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"the README links to pages that do not exist: {missing}"


def test_readme_configuration_example_is_a_valid_config(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    cfg = config.parse(tomllib.loads(block), base=tmp_path)
    assert cfg.metrics.listen == ("127.0.0.1", 9108)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_page_is_in_the_site_nav(page: str) -> None:
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    assert re.search(rf": {re.escape(page)}$", nav, re.MULTILINE), f"add docs/{page} to mkdocs.yml's nav"
