"""Fine-tune OpenAI Whisper on many GPUs: shards, DeepSpeed training, event-exact evaluation."""

import logging as _logging

__version__ = "0.1.0"

# DeepSpeed announces on stdout, at import, that it fell back to the CPU; `launch` prints commands there, and the
# project says itself what it runs on (`doctor`; train refuses bf16 without a GPU). Added before DeepSpeed creates
# the logger, which keeps it.
_logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU"))
