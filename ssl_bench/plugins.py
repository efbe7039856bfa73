"""Methods from outside this repository: plugins.

Two ways to add a method without a fork (README "Your method beside the seven"):

- an installed package declares an entry point in the group ``ssl_bench.methods``; its value names a
  module (``my_pkg.methods``; an ``:attr`` suffix is ignored). The module is imported when the
  registry is built and its ``@register(...)`` calls add its methods;
- ``SSL_BENCH_PLUGINS=module[,module...]`` names importable modules that are not packaged (quick local
  work). The variable is handed on to the Ray workers of ``ssl-bench sweep``.

``SSL_BENCH_PLUGINS=`` set but empty (or blank) is the switch that turns the entry-point plugins off: only
the built-in methods are registered (e.g. to get past a broken installed plugin).

A plugin that fails to import is an error (one line naming the plugin and the error, and for an entry
point the switch; exit 2 from the command line), never skipped. ``ssl-bench methods`` still lists the
methods that did load before it names the broken plugin (:func:`collecting_failures`). A method name that
is already registered is refused.
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
#: while ``collecting_failures`` is active: the one-line errors of the plugins that failed (else they raise)
_collecting: list[list[str]] = []
#: said in the error line of a broken entry-point plugin
SWITCH = f"{ENV}= (set and empty) switches entry-point plugins off"


class PluginError(UserError):
    """A plugin could not be loaded (import error, name clash, bad registration)."""


def current_origin() -> str | None:
    return _current_origin[-1] if _current_origin else None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def entry_points_enabled() -> bool:
    """False when ``SSL_BENCH_PLUGINS`` is set but empty (or blank): the switch that turns entry-point plugins off."""
    value = os.environ.get(ENV)
    return value is None or bool(value.strip())


@contextmanager
def collecting_failures():
    """Within the block a plugin that fails to load is skipped and its one-line error appended to the yielded list
    (``ssl-bench methods``: list what works, then name what does not); everywhere else it raises."""
    failures: list[str] = []
    _collecting.append(failures)
    try:
        yield failures
    finally:
        _collecting.pop()


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


def _import(module: str, origin: str, registry: dict, entry_point: bool = False) -> None:
    if module in _loaded:
        return
    before = set(registry)
    hint = f"; {SWITCH}" if entry_point else ""  # the way past a broken installed plugin
    with _registering_as(origin):
        try:
            importlib.import_module(module)
        except PluginError as exc:
            _rollback(registry, before)
            if module in str(exc):  # a name clash already names where the method came from
                raise PluginError(f"{exc}{hint}") from None
            raise PluginError(f"plugin {module!r} ({origin}): {exc}{hint}") from None
        except Exception as exc:  # noqa: BLE001  (any import failure is reported, never skipped)
            _rollback(registry, before)
            raise PluginError(f"plugin {module!r} ({origin}) failed to import: {one_line(exc)}{hint}") from exc
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
    """Import every entry-point plugin (unless switched off: ``SSL_BENCH_PLUGINS=``), then every ``SSL_BENCH_PLUGINS``
    module (each module once). A failure raises, or within :func:`collecting_failures` is recorded and skipped."""
    plugins = [(m, o, True) for m, o in (entry_point_plugins() if entry_points_enabled() else [])]
    plugins += [(m, f"{ENV} module {m}", False) for m in env_modules()]
    for module, origin, entry_point in plugins:
        try:
            _import(module, origin, registry, entry_point)
        except PluginError as exc:
            if not _collecting:
                raise
            _collecting[-1].append(str(exc))
