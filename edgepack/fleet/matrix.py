"""A fleet matrix: models x targets, each with optional ``set:`` overrides in --set syntax, read
strictly (unknown keys, wrong types, missing files and profiles that do not load are errors naming
the file and the key, exit 2 like a profile error). Paths are relative to the matrix file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError


class MatrixError(ConfigError):
    """A fleet matrix is missing, malformed or invalid (exit 2, like a profile error)."""

    kind = "matrix error"


def _setting(value: str) -> str:
    key, sep, _ = value.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{value!r} is not key.path=value (e.g. latency.runs=30)")
    return value


Setting = Annotated[str, AfterValidator(_setting)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    spec: str = Field(min_length=1, description="models/x.py, models/x.py:function or package.module:function")
    set: list[Setting] = Field(default_factory=list, description="--set overrides for this model's builds")


class TargetEntry(_Strict):
    target: str = Field(min_length=1, description="a shipped target name or a YAML profile path")
    set: list[Setting] = Field(default_factory=list, description="--set overrides for this target's builds")


class Matrix(_Strict):
    """Paths (specs, profiles, out) are relative to the matrix file."""

    schema_version: Literal[1] = 1
    out: str | None = Field(default=None, min_length=1, description="output root (default: dist)")
    set: list[Setting] = Field(default_factory=list, description="--set overrides for every build")
    models: list[ModelEntry] = Field(min_length=1)
    targets: list[TargetEntry] = Field(min_length=1)

    @field_validator("models", "targets", mode="before")
    @classmethod
    def _short_form(cls, value: Any, info) -> Any:  # `- models/x.py` stands for `- {spec: models/x.py}`
        key = "spec" if info.field_name == "models" else "target"
        return [{key: v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


@dataclass(frozen=True)
class Build:
    """One (model, target) pair of a matrix, with its references resolved."""

    key: str  # its folder under fleet-logs/
    model: str  # as the matrix wrote it
    target: str
    spec_ref: str  # an absolute path for a spec file
    target_ref: str  # a name, or an absolute path
    target_name: str
    settings: tuple[str, ...]


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MatrixError(f"{path}: matrix file not found", "pass the path of a MATRIX.yaml "
                                                            "(README: Fleet builds)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MatrixError(f"{path}: cannot read the matrix: {exc}", "check the file's permissions and encoding") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise MatrixError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}",
                          "fix the YAML syntax at that line and column") from None
    except (RecursionError, ValueError) as exc:
        raise MatrixError(f"{path}: invalid YAML: {exc or 'nested too deeply'}", "fix or quote that value") from None


def _loc(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc)) \
        or "(top level)"


def _invalid(source: str, exc: ValidationError) -> MatrixError:
    lines = []
    for err in exc.errors():
        msg = {"extra_forbidden": "unknown key (a matrix has schema_version, out, set, models, targets; an entry "
                                  "has spec or target, and set)",
               "missing": "required key is missing"}.get(err["type"], err["msg"].removeprefix("Value error, "))
        lines.append(f"{source}: {_loc(err['loc'])}: {msg}")
    return MatrixError("\n  ".join(lines[:20]), "fix the matrix; README \"Fleet builds\" shows one")


def _spec_ref(ref: str, base: Path, where: str) -> str:
    """A spec file (resolved against the matrix's folder, and checked) or package.module:function."""
    file_part, _, function = ref.rpartition(":")
    if not file_part.endswith(".py"):
        file_part, function = ref, ""
    if not (file_part.endswith(".py") or "/" in file_part):
        return ref  # package.module:function: imported by the build, which names it if it fails
    path = (base / file_part).resolve()
    if not path.is_file():
        raise MatrixError(f"{where}: {file_part}: spec file not found (looked at {path})",
                          "spec paths are relative to the matrix file")
    return f"{path}:{function}" if function else str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"


def load_matrix(path: str | os.PathLike, settings: list[str] | None = None) -> tuple[list[Build], Path | None]:
    """The builds a matrix asks for, in order (models outer, targets inner), and its ``out`` (absolute).
    Every spec file must exist and every target must load with its settings; two targets with one
    name (their bundles would overwrite each other) or one model listed twice are errors."""
    from ..target import load_target

    path = Path(path)
    source = str(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise MatrixError(f"{source}: a matrix must be a YAML mapping, got {type(data).__name__}",
                          "give it models: and targets: lists (README: Fleet builds)")
    try:
        matrix = Matrix.model_validate(data)
    except ValidationError as exc:
        raise _invalid(source, exc) from None
    base = path.resolve().parent
    extra = [_setting(s) for s in settings or []]
    specs = [_spec_ref(m.spec, base, f"{source}: models[{i}].spec") for i, m in enumerate(matrix.models)]
    for i, ref in enumerate(specs):
        if ref in specs[:i]:
            raise MatrixError(f"{source}: models[{i}]: {matrix.models[i].spec} is listed twice "
                              f"(models[{specs.index(ref)}])", "list each model once")
    targets: list[tuple[str, str]] = []  # (ref, profile name)
    for j, entry in enumerate(matrix.targets):
        ref = entry.target
        if ref.endswith((".yaml", ".yml")) or "/" in ref:
            ref = str((base / ref).resolve())
        try:
            name = load_target(ref, settings=[*matrix.set, *entry.set, *extra]).name
        except ConfigError as exc:
            raise MatrixError(f"{source}: targets[{j}] ({entry.target}): {exc.message}", exc.hint) from None
        for other, (_, other_name) in enumerate(targets):
            if other_name == name:
                raise MatrixError(f"{source}: targets[{j}] ({entry.target}) is named {name!r} like targets[{other}]: "
                                  f"their bundles would overwrite each other", "give each profile its own `name:`")
        targets.append((ref, name))
    builds, keys = [], set()
    for i, model in enumerate(matrix.models):
        for j, entry in enumerate(matrix.targets):
            chosen = (*matrix.set, *model.set, *entry.set, *extra)
            if model.set:  # the model's settings on this target: checked here, not in the middle of a fleet
                try:
                    load_target(targets[j][0], settings=list(chosen))
                except ConfigError as exc:
                    raise MatrixError(f"{source}: models[{i}].set on targets[{j}] ({entry.target}): {exc.message}",
                                      exc.hint) from None
            key = _slug(Path(model.spec).name.replace(".py", "")) + "--" + _slug(targets[j][1])
            while key in keys:
                key += "_"
            keys.add(key)
            builds.append(Build(key, model.spec, entry.target, specs[i], targets[j][0], targets[j][1], chosen))
    return builds, (base / matrix.out).resolve() if matrix.out else None
