"""Validation rules for readings: ranges, units, limits (DESIGN section 3).

Built from the ``[fields.<name>]`` and ``[payload]`` config sections; both
validator implementations take a PayloadRules and must judge identically.
"""
from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["FieldRule", "PayloadLimits", "PayloadRules", "DEFAULT_FIELD_RULES"]

_PositiveInt = Annotated[int, Meta(ge=1)]


class FieldRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rule for one known metric.

    ``min``/``max`` are inclusive. For ``temperature`` they are in degrees
    Celsius and apply after unit conversion (the record carries
    ``temperature_mc``, integer milli-degrees). ``integer = true`` requires an
    integral value (an integral float such as 3700.0 is accepted and stored
    as int).
    """

    min: float | None = None
    max: float | None = None
    integer: bool = False


DEFAULT_FIELD_RULES: dict[str, FieldRule] = {
    "temperature": FieldRule(min=-40.0, max=125.0),
    "battery_mv": FieldRule(min=0, max=65535, integer=True),
    "humidity": FieldRule(min=0.0, max=100.0),
}


class PayloadLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The per-reading and per-payload limits, declared once: the ``[payload]``
    config section is this struct (``gridgate.config.PayloadConfig``), and the
    validator's rules extend it with the field rules."""

    location_levels: tuple[str, ...] = ("region", "site", "zone")
    max_future_skew_s: Annotated[int, Meta(ge=0)] = 300
    max_fields: _PositiveInt = 64
    max_tags: _PositiveInt = 32
    max_tag_key_length: _PositiveInt = 64
    max_tag_value_length: _PositiveInt = 256
    max_payload_bytes: _PositiveInt = 1_048_576
    max_batch_items: _PositiveInt = 10_000


class PayloadRules(PayloadLimits, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What both validators take: the ``[payload]`` limits and ``[fields.*]``."""

    fields: dict[str, FieldRule] = msgspec.field(default_factory=lambda: dict(DEFAULT_FIELD_RULES))
