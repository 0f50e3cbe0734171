"""What the warm interpreter of `launcher.testing.ranks` imports once: torch, transformers' Whisper, DeepSpeed and
the project's training and evaluation code, their lazy imports included (DeepSpeed's engine imports its Muon
optimizer, and through it torch's inductor, on its first optimizer check: ~1.6 s a rank)."""

import deepspeed  # noqa: F401
import deepspeed.checkpoint.ds_to_universal  # noqa: F401
import deepspeed.comm  # noqa: F401
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
import torch  # noqa: F401
import torch.distributed  # noqa: F401
import transformers  # noqa: F401
from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: F401

import launcher.cli  # noqa: F401
import launcher.data.loader  # noqa: F401
import launcher.doctor  # noqa: F401
import launcher.evaluation.standalone  # noqa: F401
import launcher.train  # noqa: F401
import launcher.training.periodic  # noqa: F401
import launcher.training.trainer  # noqa: F401
