"""Every third-party module that the code or the tests import is named in a requirements file, so a
fresh install (CI's new venv, a new user's) has it. httpx was missing for months: the machine CI ran
on still had it from an earlier install."""

import ast
import importlib.metadata
import re
import sys
import tomllib

from conftest import ROOT

SKIP = {"venv", "build", "dist", "node_modules", "__pycache__"}  # and every hidden folder (.venv, .git)


def sources():
    return [
        p
        for p in ROOT.rglob("*.py")
        if not any(part in SKIP or part.startswith(".") for part in p.relative_to(ROOT).parts[:-1])
    ]


def imported(files) -> dict:
    """Top-level module -> the files that import it (absolute imports only)."""
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def declared(path) -> set:
    """The distributions a requirements file names, following its -r includes."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            names |= declared(path.parent / line.split(None, 1)[1])
        elif line and not line.startswith(("-", ".", "/")):  # a path is a project of ours (./kernels)
            names.add(normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)[0]))
    return names


def built_with(pyproject) -> set:
    """What a project of ours (kernels/) names to build and to run: its pyproject.toml's requirements."""
    data = tomllib.loads(pyproject.read_text())
    names = data.get("build-system", {}).get("requires", []) + data.get("project", {}).get("dependencies", [])
    return {normal(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", n)[0]) for n in names}


def test_every_third_party_module_imported_is_named_in_a_requirements_file():
    files = sources()
    ours = {p.stem for p in files} | {p.parent.name for p in files if p.name == "__init__.py"}
    named = set().union(*(declared(p) for p in ROOT.glob("requirements*.txt")))
    named |= set().union(*(built_with(p) for p in ROOT.glob("*/pyproject.toml")))
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(imported(files).items()):
        if module in sys.stdlib_module_names or module in ours or module == "__future__":
            continue
        dists = {normal(d) for d in providers.get(module, [])}
        if not dists & named:
            got = f"installed here by {', '.join(sorted(dists))}" if dists else "not installed here"
            missing.append(f"{module} (imported in {', '.join(sorted(where))}; {got})")
    assert not missing, "named in no requirements file: " + "; ".join(missing)


def test_the_check_sees_the_imports_of_code_and_tests():
    # The test above can fail: it finds what the server's tests import, and what they import it for.
    found = imported(sources())
    assert "tests/test_server.py" in found["httpx"] and "server.py" in found["uvicorn"]
    assert "mlx" in found and "chat" in found
