"""README "Licences" lists every Python package the server needs at run time, with the licence
that package's own metadata declares, and none of them declares the GPL.

The runtime packages are requirements.txt and everything they require, as installed in this
environment. When a dependency is added or changes its licence, this fails until the README
says so; `python tests/test_licences.py` prints the rows to paste.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def runtime_distributions() -> dict[str, importlib.metadata.Distribution]:
    """requirements.txt and its dependencies, recursively (markers evaluated here): {name: dist}."""
    pending = [Requirement(line.split("#")[0]) for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.split("#")[0].strip()]
    found: dict[str, importlib.metadata.Distribution] = {}
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found[name] = importlib.metadata.distribution(name)
        pending.extend(Requirement(text) for text in found[name].requires or [])
    return found


def declared_licence(dist: importlib.metadata.Distribution) -> str:
    """The SPDX License-Expression; else a one-line License field; else the licence classifiers."""
    metadata = dist.metadata
    if metadata.get("License-Expression"):
        return metadata["License-Expression"]
    text = (metadata.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 60:
        return text
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    return " / ".join(classifiers) + " (classifier)" if classifiers else "(none declared)"


def readme_licences() -> dict[str, str]:
    """{package: licence} from the Python table under README "## Licences"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Licences\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| Python package |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[canonicalize_name(cells[0].strip("`"))] = cells[1]
    return rows


def is_gpl(licence: str) -> bool:
    return re.search(r"(?<![L])GPL|General Public License", licence.replace("Lesser General", "")) is not None


def test_every_runtime_package_is_in_the_readme_with_its_declared_licence():
    documented = readme_licences()
    installed = runtime_distributions()
    missing = {name: declared_licence(dist) for name, dist in installed.items() if name not in documented}
    assert not missing, f"README Licences lacks: {missing}"
    wrong = {name: (documented[name], declared_licence(dist)) for name, dist in installed.items()
             if documented[name] != declared_licence(dist)}
    assert not wrong, f"README Licences says (README, metadata): {wrong}"


def test_no_runtime_package_declares_the_gpl():
    assert not {name: declared_licence(d) for name, d in runtime_distributions().items()
                if is_gpl(declared_licence(d))}


def test_gpl_detection():
    assert is_gpl("GPL-2.0-or-later") and is_gpl("GNU General Public License v3 (GPLv3) (classifier)")
    assert not is_gpl("LGPL-2.1-or-later") and not is_gpl("GNU Lesser General Public License v3 (LGPLv3)")
    assert not is_gpl("BSD-3-Clause AND MIT")


if __name__ == "__main__":
    for name, dist in sorted(runtime_distributions().items()):
        print(f"| `{dist.metadata['Name']}` | {declared_licence(dist)} | {dist.version} |")
