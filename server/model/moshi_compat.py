"""Every use of moshi's private parts, in one place, pinned to the moshi version it was written for.

Three things moshi 0.2.13 keeps private are needed here: the 7B architecture's
keyword arguments (PersonaPlex checkpoints name only their type and reuse it),
the LM's initial token (our persona generator fills its own cache with it), and
the switch behind `no_compile()` (a CPU model is served without torch.compile).
Each is checked where it is read, so an upgrade that moves one fails loudly with
`MoshiChanged` instead of loading a wrong model.
"""

from __future__ import annotations

from typing import Any

import moshi
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

PINNED_MOSHI = "0.2.13"


class MoshiChanged(RuntimeError):
    """The installed moshi does not keep something where this module expects it."""


def check_version() -> None:
    if moshi.__version__ != PINNED_MOSHI:
        raise MoshiChanged(f"moshi-webrtc is written against moshi {PINNED_MOSHI}, found {moshi.__version__}: "
                           "check server/model/moshi_compat.py against it, then update the pin in pyproject.toml")


def moshi_7b_lm_kwargs() -> dict[str, Any]:
    """A copy of moshi's built-in 7B LM configuration (`loaders._lm_kwargs`)."""
    check_version()
    kwargs = getattr(loaders, "_lm_kwargs", None)
    if not isinstance(kwargs, dict) or "dim" not in kwargs:
        raise MoshiChanged("moshi.models.loaders._lm_kwargs (the 7B LM configuration) is gone or changed")
    return dict(kwargs)


def initial_token(lm: LMModel) -> torch.Tensor:
    """The token the LM starts every stream with (`LMModel._get_initial_token`)."""
    check_version()
    method = getattr(lm, "_get_initial_token", None)
    if method is None:
        raise MoshiChanged("moshi's LMModel._get_initial_token is gone")
    return method()


def disable_torch_compile() -> None:
    """Turn off moshi's lazy `torch.compile` of its small kernels for this whole process.

    moshi reads NO_TORCH_COMPILE once, at import, and otherwise compiles on first use: on a 2-core CPU
    that is ~25 s of a ~26 s warm-up, for a tiny model that runs faster than real time without it. Its
    public `no_compile()` only covers a `with` block; the flag it sets is what is set here, for good."""
    check_version()
    from moshi.utils import compile as moshi_compile

    if not isinstance(getattr(moshi_compile, "_compile_disabled", None), bool):
        raise MoshiChanged("moshi.utils.compile._compile_disabled (what no_compile() sets) is gone or changed")
    moshi_compile._compile_disabled = True
