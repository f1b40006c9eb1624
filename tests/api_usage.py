"""Which names of a third-party API our code uses, read from the code (its syntax tree), for the
conformance tests that look each one up in the real library (TensorRT, pycuda).

A name is a dotted path from the library's root: ``ILogger.Severity.ERROR`` (TensorRT, whose
root is the module itself) or ``driver.Context.push`` (pycuda). It is found where the code
spells it out:

- chains on a variable bound to the library (``roots``: ``trt`` -> ``""``, ``cuda`` -> ``"driver"``),
  each inner link a name as well (``ILogger.Severity`` and ``ILogger``);
- methods and properties on variables that hold the library's objects (``holders``: ``engine`` ->
  ``ICudaEngine``), with or without ``self.``; a holder of many (``_dev`` -> ``DeviceAllocation[]``,
  a dict or list) gives its objects by subscript (``self._dev[name].free``);
- calls: a constructor's result is its class (``cuda.Device(0).retain_primary_context``), a
  function's result is what ``returns`` says (``driver.Context.get_device`` -> ``driver.Device``),
  and calling an object that holds one of the library's callables names ``__call__`` and each
  keyword (``Function.__call__(block)``);
- our subclasses of the library's interfaces: each method they define overrides one of the
  interface's, and a misspelt override is silently never called.

What the code reaches any other way (a value passed through a function) is not seen; a test of
each reader checks that it finds the names it exists for.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Library:
    """How the code refers to one library (see the module's docstring)."""

    roots: Mapping[str, str]
    holders: Mapping[str, str] = field(default_factory=dict)
    returns: Mapping[str, str] = field(default_factory=dict)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_class(path: str) -> bool:
    return path.rsplit(".", 1)[-1][:1].isupper()


# What an expression denotes: a path into the library itself (module, class, function), an
# object of one of its types, or a member (method, property) reached from such an object.
_LIBRARY, _OBJECT, _MEMBER, _MANY = "library", "object", "member", "many"


class _Reader(ast.NodeVisitor):
    def __init__(self, library: Library) -> None:
        self.library = library
        self.found: set[str] = set()

    def _name(self, name: str) -> tuple[str, str] | None:
        if name in self.library.roots:
            return _LIBRARY, self.library.roots[name]
        if name in self.library.holders:
            held = self.library.holders[name]
            return (_MANY, held[:-2]) if held.endswith("[]") else (_OBJECT, held)
        return None

    def resolve(self, node: ast.AST) -> tuple[str, str] | None:
        """(what ``node`` denotes, its dotted path or type), or None for anything else."""
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Subscript):  # an element of a holder of many (``self._functions[k]``)
            held = self.resolve(node.value)
            return (_OBJECT, held[1]) if held is not None and held[0] == _MANY else None
        return None

    def _attribute(self, node: ast.Attribute) -> tuple[str, str] | None:
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return self._name(node.attr)
        base = self.resolve(node.value)
        if base is None or base[0] in (_MEMBER, _MANY) or node.attr.startswith("__"):
            return None  # a member's own attributes (its type is not known), or the container's
        path = _join(base[1], node.attr)
        self.found.add(path)
        return (_LIBRARY if base[0] == _LIBRARY else _MEMBER), path

    def _call(self, node: ast.Call) -> tuple[str, str] | None:
        callee = self.resolve(node.func)
        if callee is None:
            return None
        kind, path = callee
        if kind == _OBJECT:  # calling an object the library made: its __call__, with these keywords
            self.found.add(f"{path}.__call__")
            self.found |= {f"{path}.__call__({k.arg})" for k in node.keywords if k.arg}
            return None
        if kind == _LIBRARY:
            self.found.add(path)  # a function or class called (also one imported by name)
        if path in self.library.returns:
            return _OBJECT, self.library.returns[path]
        return (_OBJECT, path) if kind == _LIBRARY and _is_class(path) else None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.resolve(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.resolve(node)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            interface = self.resolve(base)
            if interface is not None and interface[0] == _LIBRARY:
                self.found |= {_join(interface[1], f.name) for f in node.body
                               if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}  # fmt: skip
        self.generic_visit(node)


def used_names(files: Mapping[Path, Library]) -> set[str]:
    """Every name of the library each file uses, read as ``files`` says the file refers to it."""
    found: set[str] = set()
    for path, library in files.items():
        reader = _Reader(library)
        reader.visit(ast.parse(path.read_text()))
        found |= reader.found
    return {name for name in found if name}
