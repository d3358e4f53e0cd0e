"""Method names, option strings and presets.

A method spec is a name or preset, optionally with options: "tome:r=8", "fastv:k=2,ratio=0.5".
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

from .errors import SlimVLMError
from .method import Method, Stage

_METHODS: dict[str, type[Method]] = {}

PRESETS: dict[str, str] = {
    "fastv-k2-r50": "fastv:k=2,ratio=0.5",
    "fastv-k2-r75": "fastv:k=2,ratio=0.75",
    "tome-r8": "tome:r=8",
    "tome-r16": "tome:r=16",
    "visionzip-64": "visionzip:dominant=54,contextual=10",
    "visionzip-128": "visionzip:dominant=108,contextual=20",
    "visionzip-192": "visionzip:dominant=162,contextual=30",
    "divprune-64": "divprune:budget=64",
    "divprune-128": "divprune:budget=128",
    "divprune-192": "divprune:budget=192",
    # MustDrop's budgets are threshold-driven (the authors' TextVQA scripts for LLaVA-1.5-7B): the kept count
    # varies per image and "64/128/192" is the visual-token count averaged over all LLM layers on LLaVA-1.5-7B,
    # hence the name; another model keeps what its attention earns (the testbed: 226 and 315 for -64 and -192)
    "mustdrop-llava7b-64": "mustdrop:global_thr=0.011,individual_thr=0.01",
    "mustdrop-llava7b-128": "mustdrop:global_thr=0.0012,individual_thr=0.001",
    "mustdrop-llava7b-192": "mustdrop:global_thr=0.001,individual_thr=0.001",
    # DyMU's average tokens per image on LLaVA-1.5 (paper Table 2: 89+-27, 195+-47, 394+-57 of 576); the
    # thresholds come from `slimvlm calibrate --method dymu --target N`, passed as thresholds=FILE
    "dymu-low": "dymu:target=89",
    "dymu-mid": "dymu:target=195",
    "dymu-high": "dymu:target=394",
}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _METHODS[cls.name] = cls
    return cls


def _option_parameters(cls: type[Method]) -> dict[str, inspect.Parameter]:
    """The options a method takes: the named parameters of its __init__."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters
    return {name: p for name, p in params.items() if name != "self" and p.kind in named}


def _ensure_loaded() -> None:
    importlib.import_module(f"{__package__}.methods")  # importing registers the built-in methods


def registered() -> dict[str, type[Method]]:
    """Every registered method's class, by name (sorted)."""
    _ensure_loaded()
    return dict(sorted(_METHODS.items()))


def methods() -> dict[str, dict[str, Any]]:
    """Every registered method: its one-line description, stages and options with defaults."""
    out = {}
    for name, cls in registered().items():
        out[name] = {
            "description": cls.description,
            "stages": [stage.name.lower() for stage in sorted(cls.stages)],
            "options": {p: param.default for p, param in _option_parameters(cls).items()},
        }
    return out


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'fastv:k=2,ratio=0.5' -> ('fastv', {'k': '2', 'ratio': '0.5'}): the option texts, presets expanded."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    if name in PRESETS:
        name, options = _split_spec(PRESETS[name])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SlimVLMError(f"cannot read option {item!r} in {spec!r}; write options as key=value, e.g. 'tome:r=8'")
        options[key.strip()] = value.strip()
    return name, options


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'fastv:k=2,ratio=0.5' -> ('fastv', {'k': 2, 'ratio': 0.5}); presets expand first."""
    name, texts = _split_spec(spec)
    return name, {key: _parse_value(text) for key, text in texts.items()}


def _option_types(cls: type[Method]) -> dict[str, tuple[type, ...]]:
    """Per option, the plain types its annotation admits (None left out); options without one are absent."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return {}
    out = {}
    for name, hint in hints.items():
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
        kinds = tuple(k for k in kinds if isinstance(k, type) and k is not type(None))
        if kinds:
            out[name] = kinds
    return out


def _option_from_text(method: str, key: str, text: str, kinds: tuple[type, ...] | None) -> Any:
    """An option written in a spec, read as the type its method declares."""
    if kinds is None:
        return _parse_value(text)
    if text.lower() == "none":
        return None
    for kind in (bool, int, float):
        if kind in kinds:
            if kind is bool and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if kind is not bool:
                try:
                    return kind(text)
                except ValueError:
                    pass
    if str in kinds:
        return text
    raise SlimVLMError(_type_message(method, key, text, kinds))


def _check_option(method: str, key: str, value: Any, kinds: tuple[type, ...] | None) -> Any:
    """An option given from Python: bool, int and float are not taken for one another (2.5 is no r)."""
    if kinds is None or value is None or (str in kinds and not isinstance(value, (bool, int, float))):
        return value
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int):
        ok = int in kinds or float in kinds
    elif isinstance(value, float):
        ok = float in kinds
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise SlimVLMError(_type_message(method, key, repr(value), kinds))
    return value


def _type_message(method: str, key: str, given: str, kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}
    examples = {bool: "true", int: "8", float: "0.5", str: "..."}
    wanted = " or ".join(names.get(k, k.__name__) for k in kinds)
    return f"{method}: option {key}={given} must be {wanted}, e.g. '{method}:{key}={examples.get(kinds[0], '...')}'"


def build(spec: str | Method, **overrides: Any) -> Method:
    """A method instance from a spec string (or an instance, returned as is)."""
    if isinstance(spec, Method):
        if overrides:
            raise SlimVLMError("options cannot be given with a method instance; set them when building it")
        return spec
    _ensure_loaded()
    name, texts = _split_spec(spec)
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS) + sorted(PRESETS))
        raise SlimVLMError(f"unknown method {name!r}; known methods and presets: {known}")
    cls = _METHODS[name]
    params = _option_parameters(cls)
    unknown = sorted((set(texts) | set(overrides)) - set(params))
    if unknown:
        valid = ", ".join(params) or "none"
        raise SlimVLMError(f"method {name!r} has no option {', '.join(unknown)}; its options: {valid}")
    kinds = _option_types(cls)
    options = {key: _option_from_text(name, key, text, kinds.get(key)) for key, text in texts.items()}
    options.update({key: _check_option(name, key, value, kinds.get(key)) for key, value in overrides.items()})
    method = cls(**options)
    method._options = {p: getattr(method, p, param.default) for p, param in params.items()}
    return method


def check_compatible(chosen: list[Method]) -> None:
    """At most one method per stage: two methods that both act at a stage would fight over it."""
    owner: dict[Stage, Method] = {}
    for method in chosen:
        for stage in method.stages:
            if stage in owner:
                raise SlimVLMError(
                    f"methods {owner[stage].name!r} and {method.name!r} both act at stage {int(stage)} "
                    f"({stage.name.lower()}); combine methods of different stages, e.g. ['tome:r=8', 'fastv']"
                )
            owner[stage] = method


def check_runs(model, runs: list[list[str]]) -> None:
    """Refuse a bad run before any runs: every composition's specs built, compatible, and accepted
    by this model (layers, budgets, and what each method was made for: thresholds, weights)."""
    from .models import adapter_for

    adapter = adapter_for(model)
    for specs in runs:
        chosen = [build(spec) for spec in specs]
        check_compatible(chosen)
        for method in chosen:
            adapter.check_method(method)
            method.check_identity(model)


def families_taking(method: str) -> tuple[list[str], list[str]]:
    """The model classes (less "ForConditionalGeneration") that take the registered method `method`, and those
    that refuse it whatever the checkpoint, judged on the method as its defaults build it (else its first
    preset, else at budget=64)."""
    from .models import ADAPTERS

    candidates = [method] + [spec for preset, spec in PRESETS.items() if spec.split(":")[0] == method] + [f"{method}:budget=64"]
    for spec in candidates:
        try:
            built = build(spec)
            break
        except SlimVLMError:
            continue
    else:
        raise SlimVLMError(f"{method}: none of {candidates} builds; give it a preset")
    taking, refusing = [], []
    for name, adapter in ADAPTERS.items():
        (refusing if adapter.refusal(built) else taking).append(name.removesuffix("ForConditionalGeneration"))
    return taking, refusing
