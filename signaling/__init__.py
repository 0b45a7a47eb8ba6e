"""moshi-webrtc signaling: the aiohttp app (offer/answer, ICE servers, auth, limits)."""
