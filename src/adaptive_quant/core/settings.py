"""The machinery every settings tree shares: the gateway's ServeSettings and the training ExperimentConfig.

A tree is a `SettingsRoot` (a pydantic-settings `BaseSettings`) over sections (`Section`):
extra="forbid" (an unknown key is refused, never ignored), strict types (an integer setting takes
an integer, a boolean true or false, a number setting an integer or a float; text settings take
text) and frozen (a caller that wants other values builds a copy: `model_copy(update=...)`).

One loader, `SettingsRoot.load(path, overrides, environ)`, on pydantic-settings' stock sources,
first wins: overrides (`--set key.path=value`, flags: `InitSettingsSource`) > environment
(`EnvSettingsSource`, for a tree with an `env_prefix`) > YAML file (`YamlConfigSettingsSource`) >
the defaults. Values typed by a person, overrides and environment variables, are read as YAML
scalars, so `12`, `0.5`, `true`, `[8, 16]` get their natural types, except where the setting is
text: there the text is kept as typed (an API key `0x1F` or `yes` must not become 31 or True; a
text setting that may be null takes `null` as None).

Every failure is a `ConfigError` whose message names the dotted key, what was given and what is
accepted: "setting 'server.port': must be > 0, got -1", "unknown config key 'train.epocs'; known
here: batch_size, bf16, ...", and the variable a value came from: "(from AQ_SERVER__PORT)". Checks
that involve several fields raise `FieldError(field, why)` in a model validator, so the message
still names the field.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)


class ConfigError(ValueError):
    """A settings file, override or value is invalid; the message names the key and what is accepted."""


class FieldError(ValueError):
    """Raise inside a model validator: `field` (relative to the model, may be dotted) is wrong, `why` says how."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(why)
        self.field = field
        self.why = why


class Section(BaseModel):
    """A node of a settings tree: unknown keys refused, strict types, frozen, errors translated to ConfigError.

    `config_key` is where the section sits in its tree ("routing", "train") and `config_noun` how
    messages call a key ("setting", "config key"); both only shape the messages of a section built
    on its own (`RoutingConfig(speed_tolerance=2)`): inside a tree the loader names the full path.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    config_noun: ClassVar[str] = "setting"
    config_key: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), type(self).config_noun, type(self).config_key) from None

    # Only for a section built on its own: pydantic validates a nested section without calling this
    # (as it does for its own __init__, which carries the same mark), so the tree's loader sees the
    # ValidationError with the full path and words it once
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def validate(model: type[BaseModel], data: Any, noun: str = "setting") -> Any:
    """`model.model_validate(data)`, with a ValidationError turned into a ConfigError naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, model, noun) from None


# ----------------------------------------------------------------------------- the loader


class SettingsRoot(BaseSettings):
    """The root of a settings tree, built from pydantic-settings' stock sources (see the module's doc).

    A subclass sets `env_prefix` (and `env_nested_delimiter`) in its model_config to read the
    environment; without one it reads arguments and a file only. The root itself is not strict
    (its sections are, and its own scalar fields say `strict=True`): in a strict settings class the
    stock environment source converts text by pydantic's lax rules before validation, where these
    trees read it as YAML scalars (`type_text`), the rule `--set` follows.

    Built directly (`ServeSettings(repository="r")`), a tree reads its arguments and, if it has an
    env_prefix, os.environ; `load` adds a file and takes the environment as an argument.
    """

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, enable_decoding=False)
    config_noun: ClassVar[str] = "setting"  # how messages call a key
    file_noun: ClassVar[str] = "settings file"  # how messages call the file

    def __init__(self, /, **values: Any) -> None:
        built = values.get("_build_sources")  # (sources, overrides) from load(); None when built directly
        try:
            super().__init__(**values)
        except ValidationError as exc:
            sources, given = built if built else (None, values)
            origin = env_origin(type(self), _environ_of(type(self), sources), given)
            raise config_error(exc, type(self), self.config_noun, origin=origin) from None
        except SettingsError as exc:  # a source failed before validation (pydantic-settings wraps the cause)
            cause = exc.__cause__
            raise (cause if isinstance(cause, ConfigError) else ConfigError(str(exc))) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Built directly: the arguments, then os.environ where the tree reads the environment (no .env, no secrets)."""
        if cls.model_config.get("env_prefix") and isinstance(env_settings, EnvSettingsSource):
            return init_settings, TypedEnvSource(env_settings)
        return (init_settings,)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Self:
        """YAML file (optional) < environment (None: os.environ; only for a tree with an env_prefix) <
        overrides ('section.key' → value; text read as YAML scalars except for text settings)."""
        given = overrides_tree(cls, overrides or {}, cls.config_noun)
        sources: list[PydanticBaseSettingsSource] = [InitSettingsSource(cls, init_kwargs=given)]
        if cls.model_config.get("env_prefix"):
            sources.append(TypedEnvSource(EnvSettingsSource(cls), environ))
        if path is not None:
            sources.append(yaml_file_source(cls, Path(path)))
        return cls(_build_sources=(tuple(sources), given))


def yaml_file_source(root: type[SettingsRoot], path: Path) -> YamlConfigSettingsSource:
    """The stock YAML source for a file that must exist (the stock source skips a missing one) and
    hold a mapping; what is wrong with it is a ConfigError that names the file."""
    if not path.is_file():
        raise ConfigError(f"{root.file_noun} {path} does not exist")
    try:
        return YamlConfigSettingsSource(root, yaml_file=path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{root.file_noun} {path} is not valid YAML: {exc}") from None
    except (TypeError, ValueError):  # the stock source merges the top level into a dict: it is no mapping
        read_yaml(path, root.file_noun)  # words it ("must hold a mapping ..., got list")
        raise


class TypedEnvSource(PydanticBaseSettingsSource):
    """pydantic-settings' stock EnvSettingsSource, with its text read as typed by a person (`type_text`).

    `environ` (None: os.environ) is the mapping it reads: the stock source takes os.environ when it
    is built, and reads whatever its `env_vars` then holds.
    """

    def __init__(self, env: EnvSettingsSource, environ: Mapping[str, str] | None = None) -> None:
        super().__init__(env.settings_cls)
        self.env = env
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        if environ is not None:
            env.env_vars = {k if env.case_sensitive else k.lower(): v for k, v in environ.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.env.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return type_text(self.settings_cls, self.env())


def _environ_of(root: type[BaseSettings], sources: tuple[PydanticBaseSettingsSource, ...] | None) -> Mapping[str, str]:
    if sources is None:  # built directly: settings_customise_sources read os.environ, if anything
        return os.environ if root.model_config.get("env_prefix") else {}
    return next((s.environ for s in sources if isinstance(s, TypedEnvSource)), {})


def env_origin(
    root: type[BaseSettings], environ: Mapping[str, str], given: Mapping[str, Any]
) -> Callable[[str], str | None]:
    """key → the environment variable that set it ('server.port' → 'AQ_SERVER__PORT'), unless an argument did."""
    prefix = root.model_config.get("env_prefix") or ""
    delimiter = root.model_config.get("env_nested_delimiter") or ""
    names = {k.upper(): k for k in environ}

    def origin(key: str) -> str | None:
        if not prefix:
            return None
        parts = key.split("[", 1)[0].split(".")
        node: Any = given
        for p in parts:  # an explicit argument (--set, a flag) outranks the environment
            if not isinstance(node, Mapping) or p not in node:
                break
            node = node[p]
        else:
            return None
        return names.get((prefix + delimiter.join(parts)).upper())

    return origin


def stray_variables(root: type[BaseSettings], environ: Mapping[str, str]) -> list[str]:
    """Names in `environ` that share the tree's env_prefix but whose first part names no field of it
    (for the gateway: AQ_API_KEY, the client scripts' key). AQ_SERVER__PROT is not among them: its
    first part names a section, so it is a misspelt setting, refused when the tree is built."""
    prefix = (root.model_config.get("env_prefix") or "").upper()
    delimiter = root.model_config.get("env_nested_delimiter") or "\0"
    if not prefix:
        return []
    fields = root.model_fields
    return sorted(
        name
        for name in environ
        if name.upper().startswith(prefix) and name[len(prefix) :].split(delimiter, 1)[0].lower() not in fields
    )


# ----------------------------------------------------------------------------- error messages


def config_error(
    exc: ValidationError,
    model: type[BaseModel],
    noun: str = "setting",
    prefix: str = "",
    origin: Callable[[str], str | None] | None = None,
) -> ConfigError:
    """One ConfigError for every problem pydantic found; `origin(key)` may say where a value came from."""
    return ConfigError("; ".join(_describe(err, model, noun, prefix, origin) for err in exc.errors()))


def _describe(
    err: Any, model: type[BaseModel], noun: str, prefix: str, origin: Callable[[str], str | None] | None
) -> str:
    loc = list(err["loc"])
    cause = (err.get("ctx") or {}).get("error")
    if err["type"] == "value_error" and isinstance(cause, FieldError):
        loc += cause.field.split(".")
    key = _dotted([*prefix.split("."), *loc] if prefix else loc)
    source = origin(key) if origin and key else None
    named = f"{noun} '{key}'" + (f" (from {source})" if source else "")
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        known = ", ".join(sorted(owner.model_fields)) if owner else "?"
        return f"unknown {named}; known here: {known}"
    return f"{named if key else 'top level'}: {_phrase(err, cause, _field_at(model, loc))}"


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "":
            out += f".{part}" if out else str(part)
    return out


_KIND = {  # pydantic error type → what the key accepts
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "must be an integer"),
    **dict.fromkeys(("float_type", "float_parsing", "finite_number"), "must be a number"),
    **dict.fromkeys(("bool_type", "bool_parsing"), "must be true or false"),
    **dict.fromkeys(("list_type", "tuple_type"), "must be a list"),
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), "must be a mapping of keys (a section)"),
}


def _phrase(err: Any, cause: BaseException | None, field: FieldInfo | None) -> str:
    kind, ctx, given = err["type"], err.get("ctx") or {}, _shown(err.get("input"))
    if kind == "value_error":
        return cause.why if isinstance(cause, FieldError) else str(cause or err["msg"]).removeprefix("Value error, ")
    if kind == "missing":
        return "is required"
    if kind == "string_type":
        quote = " (quote it in YAML)" if isinstance(err.get("input"), (int, float, bool)) else ""
        return f"must be text{quote}, got {given}"
    if kind in ("literal_error", "enum"):
        return f"must be one of {ctx.get('expected', '?')}, got {given}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {_bounds(field) or _bound_from(kind, ctx)}, got {given}"
    if kind in _KIND:
        return f"{_KIND[kind]}, got {given}"
    return f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {given}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bound_from(kind: str, ctx: Mapping[str, Any]) -> str:
    op, name = {
        "greater_than": (">", "gt"),
        "greater_than_equal": (">=", "ge"),
        "less_than": ("<", "lt"),
        "less_than_equal": ("<=", "le"),
    }[kind]
    return f"{op} {_num(ctx.get(name))}"


def _bounds(field: FieldInfo | None) -> str:
    """The whole accepted range of a constrained number: '> 0', '>= 0', 'in [0, 1)'."""
    if field is None:
        return ""
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Gt):
            lo = ("(", ">", m.gt)
        elif isinstance(m, annotated_types.Ge):
            lo = ("[", ">=", m.ge)
        elif isinstance(m, annotated_types.Lt):
            hi = (")", "<", m.lt)
        elif isinstance(m, annotated_types.Le):
            hi = ("]", "<=", m.le)
    if lo and hi:
        return f"in {lo[0]}{_num(lo[2])}, {_num(hi[2])}{hi[0]}"
    if lo or hi:
        _, op, bound = lo or hi  # type: ignore[misc]
        return f"{op} {_num(bound)}"
    return ""


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------- walking a model's fields


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class behind an annotation (`Model`, `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return found[0] if len(found) == 1 else None
    return None


def _model_at(model: type[BaseModel] | None, loc: list[Any]) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        model = _model_of(field.annotation) if field else None
    return model


def _field_at(model: type[BaseModel], loc: list[Any]) -> FieldInfo | None:
    """The field a location ends on (None for a list item, an unknown key or the top level)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    owner = _model_at(model, loc[:-1])
    return owner.model_fields.get(loc[-1]) if owner else None


# ----------------------------------------------------------------------------- text typed by a person


def _is_text(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, str):  # str and str-valued enums
        return True
    return typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation))


def _is_optional_text(annotation: Any) -> bool:
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    rest = [a for a in typing.get_args(annotation) if a is not type(None)]
    return len(rest) == 1 and len(rest) < len(typing.get_args(annotation)) and _is_text(rest[0])


def yaml_scalar(text: str) -> Any:
    """'12' → 12, 'true' → True, '[8, 16]' → [8, 16], '' → '' ; text that is not YAML stays text."""
    if not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_text(text: str, annotation: Any) -> Any:
    """A value typed by a person, for a field of this annotation (None: unknown field, read as YAML)."""
    if annotation is not None and _is_text(annotation):
        return text
    value = yaml_scalar(text)
    if _is_optional_text(annotation):
        return None if value is None else text
    return value


def text_for(model: type[BaseModel], dotted: str, text: str) -> Any:
    """`parse_text` for the field at `dotted` ('server.port') of `model`."""
    *sections, name = dotted.split(".")
    owner = _model_at(model, sections)
    field = owner.model_fields.get(name) if owner else None
    return parse_text(text, field.annotation if field else None)


def type_text(model: type[BaseModel], tree: Mapping[str, Any]) -> dict[str, Any]:
    """`parse_text` applied to every text leaf of a nested tree, field by field (unknown keys as YAML)."""
    out: dict[str, Any] = {}
    for name, value in tree.items():
        field = model.model_fields.get(name)
        sub = _model_of(field.annotation) if field else None
        if sub is not None and isinstance(value, Mapping):
            out[name] = type_text(sub, value)
        elif isinstance(value, str):
            out[name] = parse_text(value, field.annotation if field else None)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- files and overrides


def read_yaml(path: str | Path, what: str = "settings file") -> dict[str, Any]:
    """A YAML file that must exist and hold a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys at the top level, got {type(data).__name__}")
    return data


def split_assignment(item: str, example: str) -> tuple[str, str]:
    """'server.port=9000' → ('server.port', '9000'); the value is parsed later, by the field's type."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. {example})")
    return key.strip(), text


def set_path(tree: dict[str, Any], dotted: str, value: Any, noun: str = "setting") -> None:
    """tree['a']['b'] = value for 'a.b', making sections on the way; a scalar in the way is an error."""
    *sections, name = dotted.split(".")
    node = tree
    for depth, part in enumerate(sections):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(sections[: depth + 1])
            raise ConfigError(f"cannot set {noun} '{dotted}': '{where}' is a value, not a section")
        node = child
    node[name] = value


def overrides_tree(model: type[BaseModel], overrides: Mapping[str, Any], noun: str = "setting") -> dict[str, Any]:
    """{'server.port': '9000'} → {'server': {'port': 9000}}, text read by each setting's type (`text_for`).
    A key beneath a value of `model` ('seed.x', seed a number) is refused here, naming both."""
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *sections, _ = dotted.split(".")
        for depth, part in enumerate(sections):
            owner = _model_at(model, sections[:depth])
            field = owner.model_fields.get(part) if owner else None
            if field is not None and _model_of(field.annotation) is None:
                where = ".".join(sections[: depth + 1])
                raise ConfigError(f"cannot set {noun} '{dotted}': '{where}' is a value, not a section")
        set_path(tree, dotted, text_for(model, dotted, value) if isinstance(value, str) else value, noun)
    return tree


def flatten(data: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} (or a model) → {'train.lr': 0.1}, e.g. for MLflow params."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
