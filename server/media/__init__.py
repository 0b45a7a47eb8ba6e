"""The WebRTC side of a call: peer, receive path, outbound track, ICE/TURN, and the media workers.

Media talks to the engine only through its call API (`open_call`, `submit`, results in order), so
the same peer runs against the engine in-process or a `RemoteEngine` in a worker process.
"""
