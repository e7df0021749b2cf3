"""Settings read from environment variables: one parser, so each names itself the same way when it is wrong."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from dinopre.base.errors import ConfigError


def seconds_from_env(name: str, default: float, env: Mapping[str, str] | None = None, *,
                     if_unset: str = "use") -> float:
    """A positive number of seconds from variable `name`, or `default` when it is unset or empty.

    Args:
        name: the variable, e.g. `DINOPRE_PEER_TIMEOUT`.
        default: the seconds when it is unset.
        env: where to look (the process environment when None).
        if_unset: how the error's advice reads: "unset it to {if_unset} {default} s."

    Raises:
        ConfigError: the variable is set to something other than a finite positive number.
    """
    value = (os.environ if env is None else env).get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{name}={value!r} is not a positive number of seconds; unset it to {if_unset} "
                          f"{default:g} s.")
    return seconds
