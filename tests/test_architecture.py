"""The rules of architecture.md, read off the code with `ast`: who may import whom.

Every import counts, wherever it stands (module level, inside a function, under
TYPE_CHECKING): a lazy import is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
ARCHITECTURE = PACKAGE.parent / "architecture.md"

# module -> modules of the package it must never import, and why (architecture.md).
FORBIDDEN: dict[str, tuple[set[str], str]] = {
    "config": (set(), "configuration is plain data: it imports nothing of the package"),
    "clock": (set(), "the clock depends on nothing"),
    "standin": (set(), "the stand-in is independent of the client it stands in for"),
    "cache": (
        {"errors", "middleware", "handlers", "admin", "server", "app"},
        "the cache knows no HTTP",
    ),
    "handlers": ({"credential", "vault", "upstream"}, "handlers never touch the token"),
    "lane": (
        {"credential", "vault", "upstream", "shared", "app", "server"},
        "the fast lane never touches the token, and knows no listener",
    ),
    "middleware": (
        {"credential", "vault", "cache", "shared"},
        "the middleware maps failures to answers; it knows no token and no cache",
    ),
    "admin": ({"credential", "vault", "upstream"}, "the admin handlers never touch the token"),
    "upstream": (
        {"auth", "handlers", "middleware", "admin", "cache", "shared", "errors"},
        "the client knows no caller and no HTTP answer",
    ),
    "shared": (
        {"cache", "handlers", "middleware", "admin", "errors"},
        "the shared level is under the cache",
    ),
    "purges": (
        {"cache", "handlers", "middleware", "admin", "errors", "upstream"},
        "the purge stream reaches the cache only through the callables it is given",
    ),
}
# Third-party modules with a leading underscore, or aiohttp's internals, that have no
# public equivalent: allowed in one place each, which says why in a comment.
INTERNALS_ALLOWED: dict[str, set[str]] = {
    "server": {"aiohttp.web_protocol", "aiohttp.web_server", "aiohttp.web_request"},
}
AIOHTTP_INTERNAL = ("aiohttp.web_protocol", "aiohttp.web_server", "aiohttp.web_request")


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@cache
def tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py")


def imports(module: str) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def package_imports(module: str) -> set[str]:
    """The package's modules that `module` imports (`from . import x` names x)."""
    found: set[str] = set()
    names = set(modules())
    for node in imports(module):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names if alias.name in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy."):
            found.add((node.module or "").split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("proxy."))
    found.discard(module)
    found.discard("__init__")
    return found


def test_every_module_of_the_package_is_on_the_map() -> None:
    text = ARCHITECTURE.read_text()
    missing = [m for m in modules() if f"{m}.py" not in text]
    assert missing == [], f"architecture.md does not name {missing}"


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_forbidden_imports_do_not_appear(module: str) -> None:
    forbidden, why = FORBIDDEN[module]
    found = package_imports(module)
    if not forbidden:
        assert found == set(), f"{module}.py imports {found}: {why}"
    else:
        assert found & forbidden == set(), f"{module}.py imports {found & forbidden}: {why}"


def test_the_cache_imports_no_http_library() -> None:
    names = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in imports("cache")
        for alias in node.names
    }
    assert not any(n.split(".")[0] in ("aiohttp", "yarl", "multidict") for n in names), names


def test_the_package_has_no_import_cycle() -> None:
    graph = {m: package_imports(m) for m in modules()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*visiting[visiting.index(module) :], module])
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{module}.py: from {'.' * node.level}{node.module or ''} import {alias.name}"
        for module in modules()
        for node in imports(module)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert offenders == []


def test_aiohttp_internals_are_used_in_one_place_only() -> None:
    offenders = []
    for module in modules():
        allowed = INTERNALS_ALLOWED.get(module, set())
        for node in imports(module):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                name = node.module or ""
                if name.startswith(AIOHTTP_INTERNAL) and name not in allowed:
                    offenders.append(f"{module}.py: {name}")
    assert offenders == []


# Private attributes of objects from aiohttp, read or set where it has no public API;
# each site says why in a comment.
PRIVATE_ATTRIBUTES_ALLOWED: dict[str, set[str]] = {
    "server": {"_loop", "_kwargs"},  # rebuilding aiohttp's Server with our protocol class
    "upstream": {"_retry_connection"},  # switching off aiohttp's silent resend
}


def test_no_module_reaches_into_another_objects_private_attributes() -> None:
    offenders = []
    for module in modules():
        allowed = PRIVATE_ATTRIBUTES_ALLOWED.get(module, set())
        for node in ast.walk(tree(module)):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr in allowed:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            offenders.append(f"{module}.py:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
