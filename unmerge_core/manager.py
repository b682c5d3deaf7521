"""Discover plugins through the ``unmerge`` entry-point group and look them up by name.

Built-in and third-party plugins take the same path: each entry point names a module (or object)
implementing some of the hooks in :mod:`unmerge_core.hookspecs`. A module that fails to import is
recorded in :attr:`PluginManager.broken` and skipped (or raised with ``strict=True``); two plugins
declaring the same name in the same stage are a *conflict*: both are listed by ``unmerge plugins``
(with a warning naming the two distributions), every other plugin keeps working, and only using the
conflicting name is an error.
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy
from pydantic import ValidationError

from unmerge_core import hookspecs
from unmerge_core.errors import (  # noqa: F401 - format_validation_error is re-exported
    PluginError,
    UnmergeError,
    choose_one_of,
    format_validation_error,
    plugin_errors,
    short_repr,
)
from unmerge_core.io.code import code_identity
from unmerge_core.io.store import content_key
from unmerge_core.types import OPTIONAL_MERGER_PARTS, STAGE_NAMES, STAGE_PROTOCOLS, PluginParams, PluginSpec, Stage


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
            **({"methods": self.merge_methods()} if self.spec.stage == Stage.MERGER else {}),
        }

    def merge_methods(self) -> list[str]:
        """A merger's method names (with its default parameters); empty when it cannot be built so."""
        try:
            return [str(m) for m in self.spec.factory(self.spec.params()).methods]
        except Exception:  # noqa: BLE001 - parameters without defaults, or a broken plugin
            return []


@dataclass(frozen=True)
class Conflict:
    """Two installed plugins that declare the same name for the same stage."""

    stage: str
    name: str
    plugins: tuple[InstalledPlugin, ...]

    @property
    def message(self) -> str:
        owners = " and by ".join(f"{p.distribution} {p.version} (entry point {p.entry_point})" for p in self.plugins)
        return (f"{self.stage} plugin name '{self.name}' is declared twice: by {owners}; "
                "uninstall one of them to use this name")


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
        self._load_broken: list[BrokenPlugin] = []
        self._hook_broken: list[BrokenPlugin] = []
        self._conflicts: dict[tuple[str, str], Conflict] = {}
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
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - a broken third party (even sys.exit) must not stop the others
                self._record_broken(ep.name, dist_name, f"Error importing plugin {ep.name!r}: {_describe(exc)}",
                                    self._load_broken)
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
            self._record_broken(name, distribution, f"invalid plugin {name!r}: {exc}", self._load_broken)
            return
        self._sources[id(obj)] = (name, distribution, version)
        self._plugins = None

    def unregister(self, obj: object) -> None:
        self._pm.unregister(obj)
        self._sources.pop(id(obj), None)
        self._plugins = None

    def _record_broken(self, entry_point: str, distribution: str, error: str, into: list[BrokenPlugin]) -> None:
        if self.strict:
            raise UnmergeError(error)
        into.append(BrokenPlugin(entry_point, distribution, error))

    @property
    def broken(self) -> list[BrokenPlugin]:
        """Entry points that failed to import, or whose hook failed or returned invalid descriptors."""
        self._collect()
        return [*self._load_broken, *self._hook_broken]

    @property
    def conflicts(self) -> list[Conflict]:
        """Plugin names declared by more than one installed plugin (see the module docstring)."""
        self._collect()
        return list(self._conflicts.values())

    # -- collection --------------------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, InstalledPlugin]]:
        if self._plugins is not None:
            return self._plugins
        plugins: dict[str, dict[str, InstalledPlugin]] = {stage: {} for stage in STAGE_NAMES}
        self._hook_broken = []
        self._conflicts = {}
        for stage, hook_name in hookspecs.HOOKS_BY_STAGE.items():
            hook = getattr(self._pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                obj = impl.plugin
                ep_name, dist, version = self._sources.get(id(obj), (impl.plugin_name, "local", "0"))
                try:
                    specs = list(impl.function() or [])
                    _check_specs(specs, stage)
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001
                    self._record_broken(ep_name, dist, f"plugin {ep_name!r} hook {hook_name} failed: {_describe(exc)}",
                                        self._hook_broken)
                    continue
                for spec in specs:
                    installed = InstalledPlugin(spec, ep_name, dist, version)
                    existing = plugins[stage].get(spec.name)
                    if existing is None:
                        plugins[stage][spec.name] = installed
                        continue
                    key = (stage, spec.name)
                    previous = self._conflicts[key].plugins if key in self._conflicts else (existing,)
                    self._conflicts[key] = Conflict(stage, spec.name, (*previous, installed))
        self._plugins = plugins
        return plugins

    def plugins(self, stage: str | None = None) -> list[InstalledPlugin]:
        """Installed plugins, sorted by stage order then name (both sides of a conflict are listed)."""
        collected = self._collect()
        stages = [stage] if stage else list(STAGE_NAMES)
        out: list[InstalledPlugin] = []
        for st in stages:
            listed = list(collected[st].values())
            for (c_stage, _), conflict in self._conflicts.items():
                if c_stage == st:
                    listed.extend(conflict.plugins[1:])
            out.extend(sorted(listed, key=lambda p: (p.name, p.distribution)))
        return out

    def names(self, stage: str) -> list[str]:
        return sorted(self._collect()[stage])

    def get(self, stage: str, name: str, *, where: str = "") -> InstalledPlugin:
        """Return the plugin ``name`` of ``stage`` or raise a one-line "choose one of" error."""
        collected = self._collect()
        if stage not in collected:
            raise UnmergeError(f"unknown stage {stage!r}; stages are: {', '.join(STAGE_NAMES)}")
        conflict = self._conflicts.get((stage, name))
        if conflict is not None:
            prefix = f"{where}: " if where else ""
            raise UnmergeError(prefix + conflict.message)
        try:
            return collected[stage][name]
        except KeyError:
            prefix = f"{where}: " if where else ""
            choices = choose_one_of(name, self.names(stage))
            hint = ""
            broken = [b.entry_point for b in [*self._load_broken, *self._hook_broken]]
            if broken:
                hint = f" (plugins that failed to load: {', '.join(broken)})"
            raise UnmergeError(
                f"{prefix}unknown {stage} plugin {short_repr(name)}; {choices}{hint}"
            ) from None

    def resolve(self, stage: str, name: str, params: Mapping[str, Any] | None = None, *, label: str | None = None,
                where: str = "", inner: ResolvedPlugin | None = None, params_field: str = "params",
                context: Mapping[str, Any] | None = None) -> ResolvedPlugin:
        """Look up a plugin, validate its ``params`` and bind them (nothing is built yet).

        ``where`` prefixes error messages (``<file>: decomposers[1]``); ``inner`` is the plugin a
        wrapping plugin (``spec.wraps``) wraps; ``params_field`` names the params table in errors;
        ``context`` is pydantic's validation context (a manifest passes ``{"manifest_dir": <absolute
        folder>}``, from which a params model reads its relative paths).
        """
        sep = "." if where and not where.endswith(":") else " "
        installed = self.get(stage, name, where=f"{where}{sep}plugin" if where else "")
        if installed.spec.wraps and inner is None:
            raise UnmergeError(f"{where}{sep}plugin: {stage} plugin '{name}' wraps another {stage}: write "
                               f"{name.replace('-', '_')} = true (or a table) on that {stage}'s entry")
        # a CLI flag (``--param NAME``) names the parameters on its own; a manifest field follows its table
        params_where = params_field if params_field.startswith("--") else f"{where}{sep}{params_field}" if where else ""
        validated = validate_params(installed.spec, dict(params or {}), where=params_where, context=context)
        return ResolvedPlugin(label or name, installed.spec, validated, installed.distribution, installed.version,
                              inner)

    def instantiate(self, stage: str, name: str, params: dict[str, Any] | None, *, where: str = "") -> Any:
        """Validate ``params`` against the plugin's model and build its implementation object."""
        return self.resolve(stage, name, params, where=where).build()


_INSTANCES: dict[tuple[Any, str, str], Any] = {}


@dataclass(frozen=True)
class ResolvedPlugin:
    """A plugin bound to its validated parameters (a manifest entry, or an ``unmerge attribute`` option).

    ``build()`` makes the implementation object and checks it against its stage's Protocol
    (:data:`unmerge_core.types.STAGE_PROTOCOLS`); ``instance()`` builds it once per process.
    """

    label: str
    spec: PluginSpec
    params: PluginParams
    distribution: str
    version: str
    inner: ResolvedPlugin | None = None

    @property
    def stage(self) -> str:
        return self.spec.stage.value

    def build(self) -> Any:
        """A new implementation object (metrics get a fresh one per run: they may keep state)."""
        with plugin_errors(self.stage, self.label):
            if self.spec.wraps:
                if self.inner is None:
                    raise UnmergeError(f"{self.stage} plugin '{self.label}' wraps another plugin; none was given")
                built = self.spec.factory(self.params, self.inner.build())
            else:
                built = self.spec.factory(self.params)
        check_protocol(built, self.spec.stage, self.label)
        return built

    def instance(self) -> Any:
        """The implementation object, built once per process for this plugin and configuration.

        Trainers, mergers, maskers and decomposers keep no state between calls (the hook contract),
        so one object serves every unit of work of a run.
        """
        key = (self.spec.factory, self.spec.name, content_key(self.config()))  # the factory itself: ids are reused
        built = _INSTANCES.get(key)
        if built is None:
            built = _INSTANCES[key] = self.build()
        return built

    def config(self) -> dict[str, Any]:
        """What identifies this plugin's work for caching: its name, parameters and code.

        ``code`` maps the plugin's name to its :func:`~unmerge_core.io.code.code_identity`
        (distribution, version, a hash of its package's source and of the core's), so a cached
        artifact is never reused by other code. A wrapping plugin adds its parameters under its own
        name, and its code beside the wrapped one's
        (``{"plugin": "nnls", "params": {...}, "code": {"nnls": ..., "per-layer": ...}, "per_layer": {...}}``).
        """
        code = {self.spec.name: code_identity(self.spec.factory, self.distribution, self.version,
                                              with_core=self.spec.stage is not Stage.TRAINER)}
        if self.inner is not None:
            out = self.inner.config()
            out[self.spec.name.replace("-", "_")] = self.params.model_dump(mode="json")
            out["code"] = {**out["code"], **code}
            return out
        return {"plugin": self.spec.name, "params": self.params.model_dump(mode="json"), "code": code}


def check_protocol(obj: Any, stage: Stage, label: str) -> None:
    """Refuse a built plugin object that lacks a member of its stage's Protocol, in one line."""
    _, members = STAGE_PROTOCOLS[stage]
    for member in members:
        value = getattr(obj, member, None)
        if value is None or (member != "methods" and not callable(value)):
            what = "attribute" if member == "methods" else "method"
            raise PluginError(stage.value, label, f"its object ({type(obj).__name__}) has no {what} '{member}'; "
                                                  f"a {stage.value} provides: {', '.join(members)}")
    if stage is Stage.MERGER:
        for part, part_members in OPTIONAL_MERGER_PARTS.items():
            present = [m for m in part_members if getattr(obj, m, None) is not None]
            if present and len(present) < len(part_members):
                absent = [m for m in part_members if m not in present]
                raise PluginError(stage.value, label, f"implements part of the {part} ({', '.join(present)}) "
                                                      f"but not {', '.join(absent)}: provide all of them or none")


def validate_params(spec: PluginSpec, params: dict[str, Any], *, where: str = "",
                    context: Mapping[str, Any] | None = None) -> PluginParams:
    """Validate a params table against a plugin's model; errors become one line each."""
    try:
        return spec.params.model_validate(params, context=dict(context) if context is not None else None)
    except ValidationError as exc:
        raise UnmergeError(format_validation_error(exc, prefix=where, plugin=spec)) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _check_specs(specs: Iterable[object], stage: str) -> None:
    for spec in specs:
        if not isinstance(spec, PluginSpec):
            raise TypeError(f"expected PluginSpec, got {type(spec).__name__}")
        if spec.stage is not Stage(stage):
            raise TypeError(f"plugin '{spec.name}' declares stage {spec.stage.value} in the {stage} hook")
        if not (isinstance(spec.params, type) and issubclass(spec.params, PluginParams)):
            raise TypeError(f"plugin '{spec.name}': params must subclass unmerge_core.PluginParams")
