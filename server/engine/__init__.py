"""Call slots on one shared model, the inference thread that steps them, and the process boundary.

The names a caller of the engine needs are here: `from server.engine import Engine, EngineFull`.
`server.engine.setup` builds an engine from a model source (it imports torch; this package does not).
"""

from .call import Call
from .engine import Engine
from .errors import CallClosed, ClientAtLimit, DeviceFailed, EngineFull, EngineNotReady, FrameDropped, is_device_fatal
from .frames import CallStats, FrameResult, check_frame
from .inference import EngineStats

__all__ = ["Call", "CallClosed", "CallStats", "ClientAtLimit", "DeviceFailed", "Engine", "EngineFull", "EngineNotReady",
           "EngineStats", "FrameDropped", "FrameResult", "check_frame", "is_device_fatal"]
