"""pyproject.toml against the Comfy Registry's rules (docs.comfy.org/registry/specifications, and the
checks of comfy-cli's `comfy node validate` / `publish`), and its dependencies against what the pack
imports and what ComfyUI itself installs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from headseg.tests.support.server import REPO_ROOT, comfyui_dir

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]

# The registry's accepted classifier values (comfy-cli drops all of a kind when one is not among them).
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
# Modules of ComfyUI itself, which no package index provides; torch is ComfyUI's to install (a CUDA
# or ROCm build chosen by the user): a pack that lists it can have it replaced by a CPU build.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes",
                   "comfyui_version", "node_helpers", "latent_preview", "torch"}  # fmt: skip


def _name(requirement: str) -> str:
    """'numpy>=1.25.0' -> 'numpy'; names normalised as the package index does (PEP 503)."""
    bare = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", bare).lower()


def test_node_id_follows_the_registry_rules():
    """[project] name is the node id: under 100 characters, letters, digits, '-', '_', '.', no two
    special characters in a row, starting with a letter; the registry advises leaving 'ComfyUI' out."""
    name = PROJECT["name"]
    assert len(name) < 100
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()


def test_required_and_recommended_project_fields():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    assert PROJECT["description"].strip()
    assert re.fullmatch(r"https://\S+", PROJECT["urls"]["Repository"])
    assert re.fullmatch(r">=3\.\d+", PROJECT["requires-python"])
    # either form the registry reads: {file = ...} naming a file of the pack, or {text = ...}
    licence = PROJECT["license"]
    assert isinstance(licence, dict) and set(licence) in ({"file"}, {"text"}), licence
    if "file" in licence:
        assert (REPO_ROOT / licence["file"]).is_file()
    assert (REPO_ROOT / PROJECT["readme"]).is_file()


def test_classifiers_are_ones_the_registry_accepts():
    """The registry reads the operating systems and accelerators from the classifiers (one value it
    does not know and comfy-cli drops every classifier of that kind); the pack runs on any system."""
    classifiers = PROJECT["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert systems == ["OS Independent"]
    assert accelerators and set(accelerators) <= ACCELERATORS, accelerators


def test_tool_comfy_fields():
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip()
    # optional; when given, a URL of an SVG, PNG, JPG or GIF (an empty string was left here)
    if "Icon" in COMFY:
        assert re.fullmatch(r"https://\S+\.(svg|png|jpe?g|gif)", COMFY["Icon"], re.IGNORECASE), COMFY["Icon"]
    # comfy-cli reads each part as [operator]X.Y.Z
    for part in COMFY["requires-comfyui"].split(","):
        assert re.fullmatch(r"(==|>=|<=|!=|~=|>|<)?\s*\d+\.\d+\.\d+", part.strip()), COMFY["requires-comfyui"]
    for folder in COMFY.get("includes", []):
        assert (REPO_ROOT / folder).is_dir(), folder
        assert folder in {"js", "example_workflows"}  # the folders ComfyUI serves from the pack


def _imported_distributions() -> dict[str, str]:
    """-> {distribution name: a module of the pack that imports it} for the third-party modules the pack
    imports (its Python files outside tests/), leaving out the standard library and ComfyUI's own."""
    by_module = importlib.metadata.packages_distributions()
    found = {}
    for path in [REPO_ROOT / "__init__.py", *(REPO_ROOT / "nodes").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top in COMFYUI_MODULES or top == "__future__":
                    continue
                assert top in by_module, f"{path.relative_to(REPO_ROOT)} imports {top}, which no installed package provides"
                for dist in by_module[top]:
                    found[_name(dist)] = str(path.relative_to(REPO_ROOT))
    return found


def test_dependencies_are_what_the_pack_imports():
    """The registry lists [project] dependencies as what the pack needs: numpy and safetensors were listed,
    while the pack imports Pillow, psutil and typing_extensions too. torch is left to ComfyUI."""
    listed = {_name(d) for d in PROJECT["dependencies"]}
    imported = _imported_distributions()
    assert "torch" not in listed
    assert set(imported) == listed, f"imported: {imported}, listed: {sorted(listed)}"


def test_dependencies_come_with_comfyui():
    """README says the pack needs nothing beyond ComfyUI's own requirements (so it has no requirements.txt
    for ComfyUI-Manager to install): each dependency is in ComfyUI's requirements.txt or one of torch's."""
    comfy_reqs = {
        _name(line) for line in (comfyui_dir() / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }  # fmt: skip
    torch_reqs = {_name(r) for r in importlib.metadata.requires("torch") or [] if "extra ==" not in r}
    for dependency in PROJECT["dependencies"]:
        assert _name(dependency) in comfy_reqs | torch_reqs, dependency
    assert not (REPO_ROOT / "requirements.txt").exists()


def _comfyignored(path: str, patterns: list[str]) -> bool:
    """Whether .comfyignore's ``patterns`` (folder names "name/", gitignore's meaning: a folder of that name at
    any depth) leave tracked file ``path`` out of the registry's archive."""
    folders = path.split("/")[:-1]
    return any(p.endswith("/") and p.rstrip("/") in folders for p in patterns)


def test_the_registry_archive_leaves_out_the_tests_and_ci_but_nothing_the_pack_loads():
    """.comfyignore drops tests/ and .ci/ from what comfy node publish packs (git's tracked files less its
    patterns); every file ComfyUI loads or shows (the entry point, nodes/, js/ and its docs, the examples) stays."""
    import subprocess

    lines = (REPO_ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert all(p.endswith("/") and "*" not in p for p in patterns), patterns  # what _comfyignored reads
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    left_out = {path for path in tracked if _comfyignored(path, patterns)}
    assert {path.split("/")[0] for path in left_out} == {"tests", ".ci"}
    loaded = [p for p in tracked if p.split("/")[0] in ("nodes", "js", "example_workflows") or "/" not in p]
    assert len(loaded) > 40 and not left_out & set(loaded)
    for folder in COMFY["includes"]:
        assert not _comfyignored(folder.rstrip("/") + "/x", patterns), folder
