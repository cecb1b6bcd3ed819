"""What the distribution promises a user who installs it: the licence it names ships
with it, type checkers see our annotations, and it says which Python it needs.

Read statically from pyproject.toml and the tree (building a wheel here would cost
seconds for what the metadata already states).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]


def test_the_apache_licence_ships_with_the_distribution():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    # Both images build the wheel from their copy of the tree: the licence must be in it.
    for dockerfile in ("node.Dockerfile", "coordinator.Dockerfile"):
        copies = [
            line.split()[1:-1]
            for line in (ROOT / "docker" / dockerfile).read_text().splitlines()
            if line.startswith("COPY ")
        ]
        assert any("LICENSE" in sources for sources in copies), dockerfile


def test_every_package_is_marked_typed():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert set(PACKAGE_DIRS) == {
        "crowdtrain.protocol",
        "crowdtrain.model",
        "crowdtrain.node",
        "crowdtrain.coordinator",
    }
    for package, folder in PACKAGE_DIRS.items():
        assert (ROOT / folder / "py.typed").is_file(), folder
        assert "py.typed" in data.get(package, []), package


def test_python_and_ruff_agree_on_311():
    # protocol/runspec.py imports tomllib, which Python 3.11 brought.
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_every_subpackage_is_listed_so_a_regular_install_ships_it():
    """setuptools installs only the packages pyproject lists; an editable install finds the
    others anyway, so a forgotten one breaks only a real install (pip install .)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
