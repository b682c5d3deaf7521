"""Discover plugins through the ``unmerge`` entry-point group and look them up by name.

Built-in and third-party plugins take the same path: each entry point names a module (or object)
implementing some of the hooks in :mod:`unmerge_core.hookspecs`. A module that fails to import is
recorded in :attr:`PluginManager.broken` and skipped (or raised with ``strict=True``); two plugins
declaring the same name in the same stage are an error that names both distributions.
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import ValidationError

from . import hookspecs
from .errors import UnmergeError
from .types import STAGE_NAMES, PluginParams, PluginSpec, Stage


@dataclass(frozen=True)
class InstalledPlugin:
    """A descriptor together with where it came from."""

    spec: PluginSpec
    entry_point: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stage(self) -> str:
        return self.spec.stage.value

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "stage": self.stage,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.spec.summary,
            "reference": self.spec.reference,
            "entry_point": self.entry_point,
            "params": self.spec.params.model_json_schema().get("properties", {}),
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry point that could not be loaded or returned invalid descriptors."""

    entry_point: str
    distribution: str
    error: str


class PluginManager:
    """All installed UNMERGE plugins, indexed by stage and name.

    Args:
        strict: Raise on a plugin that fails to load instead of recording it in ``broken``.
        load_entry_points: Load the ``unmerge`` entry-point group (tests may register objects by hand
            with :meth:`register` instead).
    """

    def __init__(self, *, strict: bool = False, load_entry_points: bool = True) -> None:
        self.strict = strict
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self._sources: dict[int, tuple[str, str, str]] = {}
        self._plugins: dict[str, dict[str, InstalledPlugin]] | None = None
        if load_entry_points:
            self._load_entry_points()

    # -- registration ------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist_name = ep.dist.name if ep.dist is not None else "unknown"
            dist_version = ep.dist.version if ep.dist is not None else "unknown"
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken third party must not stop the others
                self._record_broken(ep.name, dist_name, f"Error importing plugin {ep.name!r}: {exc!r}")
                continue
            self.register(obj, name=ep.name, distribution=dist_name, version=dist_version)

    def register(self, obj: object, *, name: str, distribution: str = "local", version: str = "0") -> None:
        """Register a plugin object (module or instance implementing hooks)."""
        try:
            self._pm.register(obj, name=name)
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self._pm.is_registered(obj):
                self._pm.unregister(obj)
            self._record_broken(name, distribution, f"invalid plugin {name!r}: {exc}")
            return
        self._sources[id(obj)] = (name, distribution, version)
        self._plugins = None

    def unregister(self, obj: object) -> None:
        self._pm.unregister(obj)
        self._sources.pop(id(obj), None)
        self._plugins = None

    def _record_broken(self, entry_point: str, distribution: str, error: str) -> None:
        if self.strict:
            raise UnmergeError(error)
        self.broken.append(BrokenPlugin(entry_point, distribution, error))

    # -- collection --------------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, InstalledPlugin]]:
        if self._plugins is not None:
            return self._plugins
        plugins: dict[str, dict[str, InstalledPlugin]] = {stage: {} for stage in STAGE_NAMES}
        for stage, hook_name in hookspecs.HOOKS_BY_STAGE.items():
            hook = getattr(self._pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                obj = impl.plugin
                ep_name, dist, version = self._sources.get(id(obj), (impl.plugin_name, "local", "0"))
                try:
                    specs = list(impl.function() or [])
                    _check_specs(specs, stage)
                except Exception as exc:  # noqa: BLE001
                    self._record_broken(ep_name, dist, f"plugin {ep_name!r} hook {hook_name} failed: {exc}")
                    continue
                for spec in specs:
                    installed = InstalledPlugin(spec, ep_name, dist, version)
                    existing = plugins[stage].get(spec.name)
                    if existing is not None:
                        raise UnmergeError(
                            f"{stage} plugin name '{spec.name}' is declared twice: by "
                            f"{existing.distribution} ({existing.entry_point}) and by {dist} ({ep_name})"
                        )
                    plugins[stage][spec.name] = installed
        self._plugins = plugins
        return plugins

    def plugins(self, stage: str | None = None) -> list[InstalledPlugin]:
        """Installed plugins, sorted by stage order then name."""
        collected = self._collect()
        stages = [stage] if stage else list(STAGE_NAMES)
        out: list[InstalledPlugin] = []
        for st in stages:
            out.extend(sorted(collected[st].values(), key=lambda p: p.name))
        return out

    def names(self, stage: str) -> list[str]:
        return sorted(self._collect()[stage])

    def get(self, stage: str, name: str, *, where: str = "") -> InstalledPlugin:
        """Return the plugin ``name`` of ``stage`` or raise a one-line "choose one of" error."""
        collected = self._collect()
        if stage not in collected:
            raise UnmergeError(f"unknown stage {stage!r}; stages are: {', '.join(STAGE_NAMES)}")
        try:
            return collected[stage][name]
        except KeyError:
            prefix = f"{where}: " if where else ""
            choices = ", ".join(self.names(stage)) or "(none installed)"
            hint = ""
            broken = [b.entry_point for b in self.broken]
            if broken:
                hint = f" (plugins that failed to load: {', '.join(broken)})"
            raise UnmergeError(
                f"{prefix}unknown {stage} plugin '{name}'; choose one of: {choices}{hint}"
            ) from None

    def instantiate(self, stage: str, name: str, params: dict[str, Any] | None, *, where: str = "") -> Any:
        """Validate ``params`` against the plugin's model and build its implementation object."""
        plugin = self.get(stage, name, where=where)
        validated = validate_params(plugin.spec, params or {}, where=where)
        return plugin.spec.factory(validated)


def validate_params(spec: PluginSpec, params: dict[str, Any], *, where: str = "") -> PluginParams:
    """Validate a params table against a plugin's model; errors become one line each."""
    try:
        return spec.params.model_validate(params)
    except ValidationError as exc:
        raise UnmergeError(format_validation_error(exc, prefix=where, plugin=spec)) from None


def format_validation_error(exc: ValidationError, *, prefix: str = "", plugin: PluginSpec | None = None) -> str:
    """One line per pydantic error: ``<prefix>.<field path>: <message>``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        sep = " " if prefix.endswith(":") else "."
        path = sep.join(p for p in (prefix, loc) if p)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = ""
            if plugin is not None:
                fields = ", ".join(plugin.params.model_fields)
                allowed = f"; {plugin.stage.value} plugin '{plugin.name}' accepts: {fields or '(no parameters)'}"
            msg = f"unknown field{allowed}"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def _check_specs(specs: Iterable[object], stage: str) -> None:
    for spec in specs:
        if not isinstance(spec, PluginSpec):
            raise TypeError(f"expected PluginSpec, got {type(spec).__name__}")
        if spec.stage is not Stage(stage):
            raise TypeError(f"plugin '{spec.name}' declares stage {spec.stage.value} in the {stage} hook")
        if not (isinstance(spec.params, type) and issubclass(spec.params, PluginParams)):
            raise TypeError(f"plugin '{spec.name}': params must subclass unmerge_core.PluginParams")
