"""PCM in the engine's shape: any decoded audio to float32 mono frames at the model's rate."""
