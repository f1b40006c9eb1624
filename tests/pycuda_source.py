"""pycuda's Python API as a released version defines it, read from its source distribution.

pycuda publishes no wheels: it is compiled on the device against the CUDA there, and its
extension cannot be built or imported on a machine without the CUDA toolkit and driver. So the
conformance test reads what each release defines instead, from the two places that define it:

- ``src/wrapper/wrap_cudadrv.cpp``, the Boost.Python module ``pycuda._driver``: module functions
  (``py::def("mem_alloc", ...)``, ``DEF_SIMPLE_FUNCTION(init)``), exceptions (``DECLARE_EXC``), and
  classes (``py::class_<...>("Context", ...)``) with what each defines (``.def("push", ...)``,
  ``.DEF_SIMPLE_METHOD(pop)``, ``.add_property("handle", ...)``, ``cls.attr("PORTABLE")``), a class
  running to the next one;
- ``pycuda/driver.py`` (which re-exports ``_driver``): its own functions and what it adds to the
  classes (``Function.__call__ = function_call``), with the keywords ``function_call`` accepts;
  and ``pycuda/compiler.py``.

Names behind ``#if CUDAPP_CUDA_VERSION >= ...`` count as defined: JetPack 6 has CUDA 12, newer
than every such guard the names we use sit behind.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

# The oldest release pyproject's ``trt`` extra allows, and the newest at the time of writing.
VERSIONS = ("2022.2.2", "2026.1")

_CLASS = re.compile(r"(?:py::|boost::python::)?(?:class_|enum_)<")
_FIRST_STRING = re.compile(r'"(\w+)"')
_MEMBER = re.compile(
    r'\.\s*(?:def|add_property|def_readonly|def_readwrite|add_static_property|staticmethod|value|attr)\(\s*"(\w+)"'
    r"|\.\s*(?:DEF_SIMPLE_METHOD|DEF_SIMPLE_METHOD_WITH_ARGS|DEF_SIMPLE_RO_MEMBER|DEF_SIMPLE_RW_MEMBER)\(\s*(\w+)"
)
_FUNCTION = re.compile(
    r'(?:py::|boost::python::)def\(\s*"(\w+)"|DEF_SIMPLE_FUNCTION(?:_WITH_ARGS)?\(\s*(\w+)|DECLARE_EXC\(\s*(\w+)'
)


@dataclass
class PycudaApi:
    """What one pycuda release defines: ``driver`` module names, classes with their members, the
    keywords a kernel call takes, ``compiler`` module names."""

    version: str
    driver: set[str] = field(default_factory=set)
    classes: dict[str, set[str]] = field(default_factory=dict)
    call_keywords: set[str] = field(default_factory=set)
    compiler: set[str] = field(default_factory=set)

    def has(self, dotted: str) -> bool:
        """Whether ``dotted`` (``driver.Context.push``, ``driver.Function.__call__(block)``,
        ``compiler.SourceModule``) exists in this release."""
        module, _, rest = dotted.partition(".")
        if module == "compiler":
            return rest in self.compiler
        if module != "driver":
            return False
        name, _, member = rest.partition(".")
        if not member:
            return name in self.driver
        keyword = re.fullmatch(r"__call__\((\w+)\)", member)
        if name == "Function" and keyword:
            return "__call__" in self.classes.get(name, set()) and keyword.group(1) in self.call_keywords
        return member in self.classes.get(name, set())


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def read_api(source: Path, version: str) -> PycudaApi:
    """The API the pycuda source tree at ``source`` defines."""
    api = PycudaApi(version)
    wrapper = (source / "src" / "wrapper" / "wrap_cudadrv.cpp").read_text()
    for m in _FUNCTION.finditer(wrapper):
        api.driver.add(next(g for g in m.groups() if g))
    starts = [m.start() for m in _CLASS.finditer(wrapper)]
    for start, end in zip(starts, [*starts[1:], len(wrapper)], strict=True):
        segment = wrapper[start:end]
        name = _FIRST_STRING.search(segment)
        if name is None:
            continue
        api.driver.add(name.group(1))
        members = api.classes.setdefault(name.group(1), set())
        members |= {next(g for g in m.groups() if g) for m in _MEMBER.finditer(segment)}

    driver = ast.parse((source / "pycuda" / "driver.py").read_text())
    api.driver |= _top_level_names(driver)
    for node in ast.walk(driver):
        if isinstance(node, ast.Assign):  # Function.__call__ = function_call, in _add_functionality
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    api.classes.setdefault(target.value.id, set()).add(target.attr)
        if isinstance(node, ast.FunctionDef) and node.name == "function_call":
            api.call_keywords |= {
                c.args[0].value for c in ast.walk(node)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "pop"
                and c.args and isinstance(c.args[0], ast.Constant) and isinstance(c.args[0].value, str)
            }  # fmt: skip
    api.compiler = _top_level_names(ast.parse((source / "pycuda" / "compiler.py").read_text()))
    return api
