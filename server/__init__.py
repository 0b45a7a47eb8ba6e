"""moshi-webrtc server side: the streaming engine (model, slots, inference thread) and, later, the peer."""
