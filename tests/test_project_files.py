"""The files a newcomer meets first stay consistent with each other."""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement

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


# Packaging (`pip install -e .`): checked from pyproject.toml itself, without building or installing.
# Folders with an __init__.py that are deliberately not installed.
NOT_SHIPPED = {"tests"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages(folder: Path, prefix: str = "") -> list[str]:
    """Dotted names of the packages under `folder` as setuptools' find_packages sees them (namespaces =
    false): folders with an __init__.py, below packages only."""
    names = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and (child / "__init__.py").is_file():
            names.append(prefix + child.name)
            names += _packages(child, f"{prefix}{child.name}.")
    return names


def test_setuptools_is_the_build_backend_the_config_is_written_for():
    pyproject = _pyproject()
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"
    assert any(requirement.startswith("setuptools") for requirement in pyproject["build-system"]["requires"])


def test_packaging_ships_every_package_and_module_of_the_project():
    setuptools = _pyproject()["tool"]["setuptools"]
    find = setuptools["packages"]["find"]
    assert find.get("namespaces") is False  # only folders with an __init__.py (not designs/, bench/)
    patterns = find["include"]
    packages = _packages(ROOT)
    assert {"pipeline", "tracking"} <= set(packages)
    for name in packages:
        shipped = any(fnmatchcase(name, pattern) for pattern in patterns)
        assert shipped == (name.split(".")[0] not in NOT_SHIPPED), (name, patterns)
    for module in setuptools["py-modules"]:
        assert (ROOT / f"{module}.py").is_file(), module


def test_console_scripts_point_at_existing_callables():
    pyproject = _pyproject()
    scripts = pyproject["project"]["scripts"]
    assert scripts["polylab"] == "cli:main"
    modules = set(pyproject["tool"]["setuptools"]["py-modules"])
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert module in modules, f"{name}: {module} is not one of the installed py-modules"
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        functions = {
            node.name: node
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name == attribute
        }
        assert attribute in functions, f"{name}: {module}.py defines no top-level function {attribute}()"
        # A console script calls it with no arguments.
        arguments = functions[attribute].args
        assert len(arguments.args) == len(arguments.defaults) and not arguments.posonlyargs, name


def test_dependencies_are_read_from_requirements_txt_and_parse():
    pyproject = _pyproject()
    assert "dependencies" not in pyproject["project"]  # one list, in requirements.txt
    assert "dependencies" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    # What setuptools keeps from the file: every line but blank and whole-line comment lines, verbatim.
    kept = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    names = set()
    for line in kept:
        try:
            names.add(Requirement(line).name.lower())
        except InvalidRequirement as error:
            pytest.fail(f"requirements.txt line {line!r} is no PEP 508 requirement for setuptools: {error}")
    assert {"torch", "mlflow", "click", "dask"} <= names


def test_code_version_covers_exactly_the_sources_results_depend_on(tmp_path, monkeypatch):
    """Every file under pipeline/ is placed in RESULT_SOURCES or OTHER_SOURCES; editing a result source
    changes the code version (stored runs are no longer reused), editing a plot or the report does not."""
    import shutil

    from tracking import store

    on_disk = {str(path.relative_to(ROOT)) for path in (ROOT / "pipeline").rglob("*.py")}
    assert set(store.RESULT_SOURCES) | set(store.OTHER_SOURCES) == on_disk
    assert not set(store.RESULT_SOURCES) & set(store.OTHER_SOURCES)

    copy = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(store, "PROJECT_ROOT", copy)

    def version() -> str:
        store.code_version.cache_clear()
        return store.code_version()

    try:
        original = version()
        with (copy / "pipeline/plots/report.py").open("a") as handle:
            handle.write("\n# a figure tweak\n")
        assert version() == original
        with (copy / "pipeline/train.py").open("a") as handle:
            handle.write("\n# a training change\n")
        assert version() != original
    finally:
        store.code_version.cache_clear()
