"""The engine's errors: what a caller of the engine API can be told, and which failures are fatal."""

from __future__ import annotations

from ..model.persona import PersonaError
from ..model.stepper import ModelInfo


class EngineNotReady(RuntimeError):
    """The engine has not finished warming up (or has stopped)."""


class EngineFull(RuntimeError):
    """Every call slot is taken."""


class ClientAtLimit(RuntimeError):
    """This client already holds its share of the call slots (a fair share, so that no one caller, or
    stranger, can take every line)."""


class CallClosed(RuntimeError):
    """The call was closed; it takes no more frames."""


class FrameDropped(RuntimeError):
    """The model fell behind and this frame was dropped, oldest first, to keep the delay bounded."""


class DeviceFailed(RuntimeError):
    """The model's device failed; nothing more can run on it in this process."""


def is_device_fatal(exc: BaseException) -> bool:
    """A CUDA error poisons the context: every later kernel fails, so the process must be restarted."""
    import torch  # here, not at the top: the engine module itself never touches tensors

    if isinstance(exc, DeviceFailed):
        return True
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):  # torch >= 2.9 raises CUDA failures as it
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")
    )


def no_persona_error(info: ModelInfo) -> PersonaError:
    return PersonaError(f"the model {info.name} ({info.kind}) takes no persona: text and voice prompts "
                        "need a PersonaPlex-style model")
