"""The documentation stays true to the code: every relative link in README.md and docs/ resolves (anchors included),
every recipe key is documented in docs/recipes.md, and the README stays a short front page with the quick start.

docs/recipes.md's convention, which this test reads: one `## \\`section\\`` heading per recipe section; under it (down
to the next `##` heading) tables whose first column is the key written as \\`key\\`. Tables with a `default` column
give the default as YAML in backticks (or `required`); the refused-keys table has a `method` column, the
renamed-keys table a `new name` column. The key lists come from the code, so a new key without its row fails here.
"""

import dataclasses
import functools
import re

import pytest
import yaml

from conftest import ROOT
from finetune.recipe import training as training_section
from finetune.recipe.load import SECTIONS

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RECIPES = ROOT / "docs" / "recipes.md"
QUICK_START = ("bash scripts/setup.sh && .venv/bin/finetune train recipes/tiny-chartqa.yaml",
               "bash scripts/setup.sh gguf vllm && .venv/bin/python -m pytest -q")
README_LIMIT = 12_000

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:: not files of this repository


def prose(text: str) -> str:
    """Markdown without its code blocks: a `# comment` in a shell block is no heading, a link in code no link."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def links(path) -> list[str]:
    # Code spans become a placeholder, not nothing: link text is often code ([`x.py`](x.py)).
    return LINK.findall(CODE_SPAN.sub("code", prose(path.read_text(encoding="utf-8"))))


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_docs_index_links_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index) if not SCHEME.match(t)}
    assert not [p.name for p in DOCS if p != index and p.resolve() not in linked]


def test_the_readme_is_a_short_front_page_with_the_quick_start():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) < README_LIMIT
    for command in QUICK_START:
        assert command in text


@functools.cache
def documented() -> dict[str, list[dict[str, str]]]:
    """docs/recipes.md's table rows per recipe section: {section: [{column: cell}, ...]}."""
    rows: dict[str, list[dict[str, str]]] = {}
    section, header = None, None
    for line in prose(RECIPES.read_text(encoding="utf-8")).splitlines():
        heading = HEADING.match(line)
        if heading and len(heading.group(1)) == 2:
            name = re.fullmatch(r"`(\w+)`", heading.group(2))
            section = name.group(1) if name else None
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: ") and section:
            rows.setdefault(section, []).append(dict(zip(header, cells)))
    return rows


def rows_for(section: str, key: str) -> list[dict[str, str]]:
    return [row for row in documented().get(section, []) if row.get("key") == f"`{key}`"]


def as_documented(default) -> str:
    """How docs/recipes.md writes a default: YAML, in backticks; a field without one is `required`."""
    if default is dataclasses.MISSING:
        return "required"
    text = yaml.safe_dump(default, default_flow_style=True, width=float("inf"))
    return "`" + text.removesuffix("\n...\n").strip() + "`"  # a scalar's dump ends with YAML's document end


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


SECTION_FIELDS = [(name, f) for name, cls in SECTIONS.items() if cls is not None for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("section, field", SECTION_FIELDS, ids=[f"{s}.{f.name}" for s, f in SECTION_FIELDS])
def test_every_section_key_is_documented_with_its_default(section, field):
    rows = rows_for(section, field.name)
    assert rows, f"docs/recipes.md: no row for `{field.name}` under ## `{section}`"
    assert as_documented(default_of(field)) in [row.get("default") for row in rows], (
        f"docs/recipes.md: {section}.{field.name}'s default is {as_documented(default_of(field))}")


@pytest.mark.parametrize("section", [name for name, cls in SECTIONS.items() if cls is not None])
def test_no_section_documents_a_key_it_does_not_have(section):
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    stale = [row["key"] for row in documented().get(section, []) if row.get("key", "").strip("`") not in names]
    assert not stale, f"docs/recipes.md documents keys {section} does not have: {stale}"


TRAINING_KEYS = ([(name, default) for name, _, default, _ in training_section.TRAINING_EXTENSIONS]
                 + list(training_section.TRAINING_DEFAULTS.items()))


@pytest.mark.parametrize("key, default", TRAINING_KEYS, ids=[k for k, _ in TRAINING_KEYS])
def test_every_training_extension_and_changed_default_is_documented(key, default):
    rows = rows_for("training", key)
    assert rows, f"docs/recipes.md: no row for `{key}` under ## `training`"
    assert as_documented(default) in [row.get("default") for row in rows], (
        f"docs/recipes.md: training.{key}'s default is {as_documented(default)}")


@pytest.mark.parametrize("old, new", training_section.RENAMED_TRAINING_KEYS.items())
def test_every_renamed_training_key_is_documented(old, new):
    assert f"`{new}`" in [row.get("new name") for row in rows_for("training", old)], (
        f"docs/recipes.md: no row `{old}` | `{new}` under ## `training`")


def refused_keys() -> dict[str, dict[str, str]]:
    """{method: {key: reason}}, read from the method table (finetune.recipe.methods)."""
    from finetune.recipe.methods import METHODS

    return {name: method.refused_keys for name, method in METHODS.items()}


REFUSED = [(method, key) for method, keys in refused_keys().items() for key in keys]


def test_refused_keys_are_found_in_the_code():
    assert REFUSED, "no refused training keys found: where did the code move them? Update refused_keys()"


@pytest.mark.parametrize("method, key", REFUSED, ids=[f"{m}.{k}" for m, k in REFUSED])
def test_every_refused_training_key_is_documented(method, key):
    assert any(f"`{method}`" in row.get("method", "") for row in rows_for("training", key)), (
        f"docs/recipes.md: no refused-keys row for `{key}` naming `{method}` under ## `training`")


def test_the_readme_families_table_is_generated_from_the_family_table():
    """Never hand-kept: the README holds exactly the table scripts/families_table.py makes, one row per family."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import families_table

    from finetune.models.families import FAMILIES

    readme = (ROOT / "README.md").read_text()
    assert families_table.readme_with_table(readme) == readme, "run: python scripts/families_table.py --write"
    rows = [line for line in families_table.table().splitlines()[2:]]
    assert [line.split(" | ")[1].strip("`") for line in rows] == list(FAMILIES)


def test_the_types_table_answers_every_image_text_to_text_type():
    """docs/families.md lists every type of the installed transformers, each supported or refused with a reason."""
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as TYPES

    sys.path.insert(0, str(ROOT / "scripts"))
    import families_table

    text = (ROOT / "docs" / "families.md").read_text()
    table = families_table.types_table()
    assert families_table.with_table(text, table, families_table.TYPES_BEGIN, families_table.TYPES_END) == text, \
        "run: python scripts/families_table.py --write"
    answers = {row.split(" | ")[0].strip("|` "): row.split(" | ")[2] for row in table.splitlines()[2:]}
    assert sorted(answers) == sorted(TYPES)
    assert all(a.startswith(("supported (", "refused: ")) and len(a) > 20 for a in answers.values())
