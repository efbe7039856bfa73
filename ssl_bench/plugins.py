"""Methods from outside this repository: plugins.

Two ways to add a method without a fork (README "Your method beside the seven"):

- an installed package declares an entry point in the group ``ssl_bench.methods``; its value names a
  module (``my_pkg.methods``; an ``:attr`` suffix is ignored). The module is imported when the
  registry is built and its ``@register(...)`` calls add its methods;
- ``SSL_BENCH_PLUGINS=module[,module...]`` names importable modules that are not packaged (quick local
  work). The variable is handed on to the Ray workers of ``ssl-bench sweep``.

A plugin that fails to import is an error (one line naming the plugin and the error; exit 2 from the
command line), never skipped. A method name that is already registered is refused.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from contextlib import contextmanager

from .errors import UserError

GROUP = "ssl_bench.methods"
ENV = "SSL_BENCH_PLUGINS"
BUILTIN = "built-in"

#: where the register() calls running now come from (set while a plugin module is imported)
_current_origin: list[str] = []
#: plugin modules imported so far -> their origin
_loaded: dict[str, str] = {}


class PluginError(UserError):
    """A plugin could not be loaded (import error, name clash, bad registration)."""


def current_origin() -> str | None:
    return _current_origin[-1] if _current_origin else None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def env_modules(value: str | None = None) -> list[str]:
    """The module names of ``SSL_BENCH_PLUGINS`` (comma separated; blanks ignored)."""
    value = os.environ.get(ENV, "") if value is None else value
    return [m.strip() for m in value.split(",") if m.strip()]


def entry_point_plugins() -> list[tuple[str, str]]:
    """(module, origin) of every installed ``ssl_bench.methods`` entry point, one per module."""
    out: dict[str, str] = {}
    for ep in md.entry_points(group=GROUP):
        module = ep.value.partition(":")[0].strip()
        dist = getattr(ep, "dist", None)
        origin = f"plugin {dist.name} {dist.version}" if dist is not None else f"plugin entry point {ep.name}"
        out.setdefault(module, origin)
    return sorted(out.items())


@contextmanager
def _registering_as(origin: str):
    _current_origin.append(origin)
    try:
        yield
    finally:
        _current_origin.pop()


def _import(module: str, origin: str, registry: dict) -> None:
    if module in _loaded:
        return
    before = set(registry)
    with _registering_as(origin):
        try:
            importlib.import_module(module)
        except PluginError as exc:
            _rollback(registry, before)
            if module in str(exc):  # a name clash already names where the method came from
                raise
            raise PluginError(f"plugin {module!r} ({origin}): {exc}") from None
        except Exception as exc:  # noqa: BLE001  (any import failure is reported, never skipped)
            _rollback(registry, before)
            raise PluginError(f"plugin {module!r} ({origin}) failed to import: {one_line(exc)}") from exc
    _loaded[module] = origin
    # methods the module registered while it was imported earlier by other means (e.g. a test's import)
    for name, spec in list(registry.items()):
        if spec.origin.startswith("module ") and any(
                s.__module__ == module or s.__module__.startswith(module + ".") for s in spec.stages):
            registry[name] = spec.with_origin(origin)


def _rollback(registry: dict, before: set) -> None:
    for name in set(registry) - before:
        del registry[name]


def load_plugins(registry: dict) -> None:
    """Import every entry-point plugin, then every ``SSL_BENCH_PLUGINS`` module (each module once)."""
    for module, origin in entry_point_plugins():
        _import(module, origin, registry)
    for module in env_modules():
        _import(module, f"{ENV} module {module}", registry)
