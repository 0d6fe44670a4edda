"""Network builders that an ``arch`` record may name, and the two functions that read such a record.

These are architectures with no model-zoo name: the original MXNet symbolic ResNets, the
Keras applications ResNets, and Gluon ``resnetN_v1`` with another class count. They live in
the core, not beside the readers, because reloading a bundle must rebuild them without
knowing which file format the weights once came from.

This package imports the registry (:mod:`bbadapt.core.registry`) and registers every builder
as it is imported; the registry never imports it back, so there is no circle. Whoever needs
to rebuild or validate an ``arch`` record imports it from here: importing this package is
what makes every builder known.
"""

from __future__ import annotations

from bbadapt.core.architectures import gluon_resnet, keras_resnet, symbolic_resnet  # noqa: F401 - registers builders
from bbadapt.core.registry import registered, stable_name
from bbadapt.platform.errors import ModelError


def arch_problem(arch: object) -> str | None:
    """Why ``arch`` is not a usable architecture record, or None when it is."""
    if not isinstance(arch, dict):
        return "is not a record"
    if "zoo" in arch:
        return None if isinstance(arch["zoo"], str) else "has a non-string zoo name"
    builder = arch.get("builder")
    if not isinstance(builder, str) or stable_name(builder) not in registered():
        return f"names no architecture builder of bbadapt ({builder!r})"
    if not isinstance(arch.get("kwargs", {}), dict):
        return "has non-keyword builder arguments"
    return None


def rebuild(arch: dict):
    """Build (random init, shapes materialized) the architecture an ``arch`` record names."""
    from bbadapt.core import zoo

    problem = arch_problem(arch)
    if problem:
        raise ModelError(f"unknown architecture record: it {problem}")
    if "zoo" in arch:
        return zoo.build(arch["zoo"])
    builder = registered()[stable_name(arch["builder"])]
    try:
        return builder(**dict(arch.get("kwargs", {})))
    except (TypeError, KeyError, ValueError, IndexError) as exc:  # arguments a tampered record got wrong
        raise ModelError(f"architecture record for {arch['builder']} does not fit it: {type(exc).__name__}: {exc}") from None
