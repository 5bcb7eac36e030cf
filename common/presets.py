"""One preset resolver for every trainer: the dataclass defaults are the paper's settings; with no data root
configured (in the defaults or on the command line) a bare run announces it and uses the ``demo`` preset on the
generated demo dataset; ``--preset demo|paper`` chooses explicitly; flags given on the command line always win.

The command line is parsed twice: once to learn the preset (and whatever the preset depends on, such as the
approach or the demo folder), then with the preset's values as defaults, so that every explicit flag overrides
the preset.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence, TypeVar

from common.cli import parse

C = TypeVar("C")


def resolve_preset(config_type: type[C], argv: Sequence[str], presets: Mapping[str, Callable[[C], C]],
                   data_configured: Callable[[C], bool], announce: Callable[[C], str], *,
                   description: str | None = None, use_underscores: bool = False) -> tuple[C, list[str]]:
    """Parse ``argv`` into a resolved config whose ``preset`` field names the preset applied.

    Args:
        config_type: the trainer's frozen dataclass (with a ``preset`` field: ``auto`` or a key of ``presets``).
        presets: name -> function mapping a first parse of the command line to that preset's defaults.
        data_configured: whether a parsed config points at real data (else ``auto`` means ``demo``).
        announce: the notice printed when ``auto`` picks the demo; it receives the final config, so it can
            state the settings actually used.
    Returns the config and the notices to print.
    """
    first = parse(config_type, argv, description=description, use_underscores=use_underscores)
    preset = first.preset
    if preset == "auto":
        preset = "paper" if data_configured(first) else "demo"
    defaults = dataclasses.replace(presets[preset](first), preset=preset)
    config = parse(config_type, argv, description=description, default=defaults, use_underscores=use_underscores)
    config = dataclasses.replace(config, preset=preset)
    notices = [announce(config)] if first.preset == "auto" and preset == "demo" else []
    return config, notices
