"""The files a newcomer meets first stay consistent with each other."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md needs a ```bash block under '## Quick start'"
    return [
        line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_quick_start_has_two_commands_and_ci_runs_the_second_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert "mlflow run ." in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def _requirement_lines(path: Path) -> set[str]:
    return {
        line.split("#")[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith("-r")
    }


def test_conda_environment_lists_the_pip_requirements():
    environment = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert set(pip_section) == _requirement_lines(ROOT / "requirements.txt")
    assert "torch==2.13.0" in pip_section


def test_mlproject_entry_points_call_existing_commands():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    assert {"main", "ablate", "sweep", "report"} <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        for parameter in entry.get("parameters", {}):
            assert "{" + parameter + "}" in entry["command"], (name, parameter)
