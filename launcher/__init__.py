"""Fine-tune OpenAI Whisper on many GPUs: shards, DeepSpeed training, event-exact evaluation."""

__version__ = "0.1.0"
