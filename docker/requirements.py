"""Print the third-party requirements of the given distributions' pyproject.toml files.

The images install these first, as a layer of their own, so that a source change does not
reinstall torch or LightFM; SnapLearn's own distributions (snaplearn-*) are installed after,
from the copied source, with --no-deps.

    python docker/requirements.py protos services vision_server > requirements.txt
"""

import sys
import tomllib
from pathlib import Path

requirements: list[str] = []
for folder in sys.argv[1:]:
    project = tomllib.loads((Path(folder) / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    for requirement in [*project["dependencies"], *extras.get("kafka", [])]:
        if not requirement.startswith("snaplearn-") and requirement not in requirements:
            requirements.append(requirement)
print("\n".join(requirements))
