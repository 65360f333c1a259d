"""One declaration per setting.

Every setting is a field of a settings dataclass, declared once with :func:`setting`: its type (the
annotation), default, range or choices, description, whether it decides a resume, and whether it is
a config key and a script flag. From that one declaration come

* the config schema Snakemake validates against (:func:`block_schema`; the whole file is made by
  :mod:`diffdistill.config_schema` and committed, so that Snakemake runs without the package);
* the scripts' flags (:func:`diffdistill.cli.add_dataclass_flags`);
* the resume keys (:func:`resume_keys`);
* the range checks (:func:`check`), run when a settings object is made.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import types
import typing

from diffdistill.errors import DiffdistillError

# A range bound: its JSON-schema keyword, the test a value must pass, and how an error says it.
_RANGES = {"minimum": ("minimum", operator.ge, ">="), "maximum": ("maximum", operator.le, "<="),
           "exclusive_minimum": ("exclusiveMinimum", operator.gt, ">"),
           "exclusive_maximum": ("exclusiveMaximum", operator.lt, "<")}


def setting(default=dataclasses.MISSING, *, description: str = "", minimum=None, maximum=None,
            exclusive_minimum=None, exclusive_maximum=None, choices=None, pattern: str | None = None,
            unique: bool = False, min_items: int | None = None, resume: bool = False, config: bool = True,
            flag: bool = True, schema_default: bool = True):
    """A dataclass field with its declaration. For a list the range and choices apply to its items,
    ``unique`` and ``min_items`` to the list. ``config``: a key of the config block (else a flag only,
    e.g. the trainer's seed); ``flag``: a script flag (else read by the workflow only, e.g. a job's
    GPUs). ``schema_default`` False leaves the default out of the schema: the workflow fills the key
    from another block."""
    metadata = dict(description=description, choices=tuple(choices) if choices is not None else None,
                    pattern=pattern, unique=unique, min_items=min_items, resume=resume, config=config, flag=flag,
                    schema_default=schema_default, minimum=minimum, maximum=maximum,
                    exclusive_minimum=exclusive_minimum, exclusive_maximum=exclusive_maximum)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`setting`."""
    return [item for item in dataclasses.fields(cls) if "config" in item.metadata]


def default_of(item: dataclasses.Field):
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def resume_keys(cls) -> tuple[str, ...]:
    """The settings of ``cls`` that decide whether a job may continue from saved state."""
    return tuple(item.name for item in declared(cls) if item.metadata["resume"])


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are script flags (every field of a dataclass declared without
    :func:`setting`)."""
    return [item for item in dataclasses.fields(cls) if item.metadata.get("flag", True)]


def flag_keys(cls) -> tuple[str, ...]:
    return tuple(item.name for item in flag_fields(cls))


def check(obj, where: str) -> None:
    """Each declared range and choice of ``obj``'s fields; one error naming every bad one."""
    problems = []
    for item in declared(type(obj)):
        value = getattr(obj, item.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for one in values:
            problem = _problem(one, item.metadata)
            if problem:
                problems.append(f"{item.name} {problem}, got {value!r}")
                break
        if isinstance(value, (list, tuple)):
            if item.metadata["unique"] and len(set(value)) != len(value):
                problems.append(f"{item.name} must list each value once, got {value!r}")
            if item.metadata["min_items"] is not None and len(value) < item.metadata["min_items"]:
                problems.append(f"{item.name} must list at least {item.metadata['min_items']}, got {value!r}")
    if problems:
        raise DiffdistillError(f"{where}: " + "; ".join(problems))


def _problem(value, meta) -> str | None:
    if value is None or isinstance(value, (dict, str)) and meta["choices"] is None:
        return None
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {list(meta['choices'])}"
    for key, (_, ok, sign) in _RANGES.items():
        if meta[key] is not None and isinstance(value, (int, float)) and not ok(value, meta[key]):
            return f"must be {sign} {meta[key]}"
    return None


# ---------------------------------------------------------------------------------------------- schema


def block_schema(cls, *, defaults: dict | None = None, refs: dict | None = None) -> dict:
    """The JSON schema of a config block made of ``cls``'s config settings: unknown keys refused,
    every default given (Snakemake fills them in), settings without one required. ``defaults``
    replaces some defaults (the pre-training block's); ``refs`` maps a nested settings class to its
    ``$defs`` name. A script flag carries ``x-flags: <its class>``: common.smk passes the keys of one
    class to the script that parses that class."""
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for item in declared(cls):
        if not item.metadata["config"]:
            continue
        schema = _type_schema(hints[item.name], item.metadata, refs or {})
        default = (defaults or {}).get(item.name, default_of(item))
        if default is dataclasses.MISSING:
            required.append(item.name)
        elif item.metadata["schema_default"]:
            schema["default"] = list(default) if isinstance(default, tuple) else default
        if item.metadata["description"]:
            schema["description"] = item.metadata["description"]
        if item.metadata["flag"]:
            schema["x-flags"] = cls.__name__
        properties[item.name] = schema
    block = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        block["required"] = required
    return block


def _type_schema(kind, meta, refs) -> dict:
    if kind in refs:
        return {"$ref": f"#/$defs/{refs[kind]}"}
    origin, args = typing.get_origin(kind), [a for a in typing.get_args(kind) if a is not Ellipsis]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] in refs:
            return {"$ref": f"#/$defs/{refs[inner[0]]}"}
        schemas = [_type_schema(a, meta, refs) for a in inner]
        if type(None) in args and len(schemas) == 1 and "type" in schemas[0]:
            return {**schemas[0], "type": [schemas[0]["type"], "null"]}
        return {"oneOf": schemas + ([{"type": "null"}] if type(None) in args else [])}
    if origin in (list, tuple):
        schema = {"type": "array", "items": _scalar_schema(args[0], meta)}
        if origin is tuple and len(typing.get_args(kind)) == len(args):  # a fixed-length tuple
            schema |= {"minItems": len(args), "maxItems": len(args)}
        if meta["unique"]:
            schema["uniqueItems"] = True
        if meta["min_items"] is not None:
            schema["minItems"] = meta["min_items"]
        return schema
    return _scalar_schema(kind, meta)


def _scalar_schema(kind, meta) -> dict:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    schema: dict = {"type": names[kind]}
    if meta["choices"] is not None:
        schema["enum"] = list(meta["choices"])
    if meta["pattern"]:
        schema["pattern"] = meta["pattern"]
    for key, (name, _, _) in _RANGES.items():
        if meta[key] is not None:
            schema[name] = meta[key]
    return schema


def stage_gpus():
    """The ``gpus`` key of the scoring, sampling and evaluation blocks (one declaration for the three)."""
    return setting(None, minimum=0, flag=False, description=(
        "GPUs the stage's jobs ask the scheduler for; null: 1 when device names CUDA, else 0"))
