"""The generated API reference (docs/reference/api/*.md) covers every public name of ember.

Each ``::: dotted.path`` directive there becomes a documented object when mkdocs builds the site
(`make docs`). Here, without building: every directive names an object that exists, and every name
in the ``__all__`` of ember's public packages is one of the documented objects (``ember.Trainer``
is ``ember.trainer.Trainer``, documented once).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml
from dist_helpers import REPO

API_DIR = REPO / "docs" / "reference" / "api"
PUBLIC_MODULES = (
    "ember",
    "ember.trainer",
    "ember.trainer.loggers",
    "ember.trainer.profilers",
    "ember.callbacks",
    "ember.strategies",
    "ember.precision",
    "ember.utilities",
)
NOT_OBJECTS = {"__version__"}  # a string; the ember page says what it is
_DIRECTIVE = re.compile(r"^::: *(?P<path>[\w.]+)\s*$", re.MULTILINE)


def directives(api_dir: Path = API_DIR) -> dict[str, str]:
    """``{dotted path: page}`` for every ``:::`` directive of the API pages."""
    found: dict[str, str] = {}
    for page in sorted(api_dir.glob("*.md")):
        for match in _DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            found[match["path"]] = page.name
    return found


def resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def undocumented(documented: dict[str, str]) -> list[str]:
    """``module.name`` for each public name whose object no directive documents."""
    objects = {id(resolve(path)) for path in documented}
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name not in NOT_OBJECTS and id(getattr(module, name)) not in objects:
                missing.append(f"{module_name}.{name}")
    return missing


def test_every_directive_names_an_existing_object() -> None:
    found = directives()
    assert len(found) >= 40, found  # the pages were read
    broken = []
    for path, page in found.items():
        try:
            resolve(path)
        except (ImportError, AttributeError) as error:
            broken.append(f"{page}: ::: {path} ({error})")
    assert not broken, "API directives naming no object:\n" + "\n".join(broken)


def test_every_public_name_is_documented() -> None:
    missing = undocumented(directives())
    assert not missing, (
        "public names missing from docs/reference/api/*.md (add a `::: <module>.<name>` line to the"
        " page of its package):\n" + "\n".join(missing)
    )


def test_a_missing_directive_is_reported(tmp_path: Path) -> None:
    page = (API_DIR / "callbacks.md").read_text(encoding="utf-8")
    (tmp_path / "callbacks.md").write_text(page.replace("::: ember.callbacks.Timer\n", ""))
    for other in API_DIR.glob("*.md"):
        if other.name != "callbacks.md":
            (tmp_path / other.name).write_text(other.read_text(encoding="utf-8"))
    assert undocumented(directives(tmp_path)) == ["ember.callbacks.Timer"]


def test_every_api_page_is_in_the_site_nav() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)

    def pages(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return [p for item in node for p in pages(item)]

    nav = set(pages(config["nav"]))
    api_pages = {f"reference/api/{p.name}" for p in API_DIR.glob("*.md")}
    assert api_pages <= nav, sorted(api_pages - nav)
