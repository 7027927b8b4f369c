"""The pack's front-end modules (js/*.js) link up: every name a module imports from another of the pack's
modules is exported there, every module it names exists, and every ``ns.name`` read through a namespace
import (``import * as ns``) is an export. ComfyUI loads each .js file as a module of its own, and a
broken import stops the file that has it (and those importing it) without a word outside the browser's
console; the browser tests would see it, at minutes per file, this sees it at once.
"""

from __future__ import annotations

import pathlib
import re

import pytest

JS_DIR = pathlib.Path(__file__).resolve().parents[2] / "js"
MODULES = sorted(JS_DIR.glob("*.js"))

# import { a, b as c } from "./x.js";  (across lines)
NAMED_IMPORT = re.compile(r"^import\s*\{([^}]*)\}\s*from\s*\"(\./[^\"]+)\";", re.MULTILINE)
# import * as ns from "./x.js";
NAMESPACE_IMPORT = re.compile(r"^import\s*\*\s*as\s+(\w+)\s+from\s*\"(\./[^\"]+)\";", re.MULTILINE)
# export function f / export async function f / export const A / export let a / export class C
EXPORT_DECLARATION = re.compile(r"^export\s+(?:async\s+)?(?:function\*?|const|let|var|class)\s+(\w+)", re.MULTILINE)
# export { a, b as c } from "./x.js";  or  export { a, b };
EXPORT_LIST = re.compile(r"^export\s*\{([^}]*)\}", re.MULTILINE)


def _names(listed: str, exported: bool) -> set[str]:
    """'a, b as c' -> {'a', 'b'} for an import (the names looked up), {'a', 'c'} for an export (the names given)."""
    names = set()
    for part in listed.split(","):
        words = part.split()
        if words:
            names.add(words[-1] if exported else words[0])
    return names


def namespace_uses(text: str, namespace: str) -> set[str]:
    """The names read as ``namespace.name`` in ``text`` (not a file name such as "./namespace.js")."""
    return set(re.findall(rf"(?<![\w./]){namespace}\.(\w+)", text))


def exports_of(path: pathlib.Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    names = set(EXPORT_DECLARATION.findall(text))
    for listed in EXPORT_LIST.findall(text):
        names |= _names(listed, exported=True)
    return names


def test_the_patterns_read_the_forms_the_modules_use():
    """The checks below can fail: the patterns find imports, namespace imports and exports in these files."""
    texts = [m.read_text(encoding="utf-8") for m in MODULES]
    assert sum(len(NAMED_IMPORT.findall(t)) for t in texts) >= 10
    assert any(NAMESPACE_IMPORT.search(t) for t in texts)
    assert sum(len(exports_of(m)) for m in MODULES) >= 40
    sample = 'import {\n  a,\n  b as c,\n} from "./x.js";\nexport { d, e as f } from "./y.js";\nexport async function g() {}'
    assert [_names(s, False) for s, _ in NAMED_IMPORT.findall(sample)] == [{"a", "b"}]
    assert set(EXPORT_DECLARATION.findall(sample)) == {"g"}
    assert [_names(s, True) for s in EXPORT_LIST.findall(sample)] == [{"d", "f"}]


def missing_imports(module: pathlib.Path) -> list[str]:
    """What ``module`` imports from the pack's other modules that they do not export ("name from ./x.js",
    "ns.name (./x.js)"); AssertionError when it names a module that is not there."""
    text = module.read_text(encoding="utf-8")
    missing = []
    for listed, source in NAMED_IMPORT.findall(text):
        target = (module.parent / source).resolve()
        assert target.is_file(), f"{module.name} imports from {source}, which is not in js/"
        missing += [f"{name} from {source}" for name in sorted(_names(listed, exported=False) - exports_of(target))]
    for namespace, source in NAMESPACE_IMPORT.findall(text):
        target = (module.parent / source).resolve()
        assert target.is_file(), f"{module.name} imports from {source}, which is not in js/"
        used = namespace_uses(text, namespace)
        missing += [f"{namespace}.{name} ({source})" for name in sorted(used - exports_of(target))]
    return missing


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.name)
def test_each_name_imported_from_a_pack_module_is_exported_there(module):
    missing = missing_imports(module)
    assert not missing, f"{module.name} imports names its modules do not export: {', '.join(missing)}"


def test_a_name_missing_from_a_module_is_found(tmp_path):
    """The check on a made-up pair of modules: an import of a name the other does not export is caught."""
    (tmp_path / "a.js").write_text('import { there, gone } from "./b.js";\nimport * as b from "./b.js";\nb.lost();\n')
    (tmp_path / "b.js").write_text("export function there() {}\n")
    assert missing_imports(tmp_path / "a.js") == ["gone from ./b.js", "b.lost (./b.js)"]
