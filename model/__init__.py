"""What a crowdtrain run trains: the GPT, its tokenizer, evaluation and checkpoints.

Plain single-device PyTorch. Knows nothing about networking, hivemind, the
coordinator or training loops; ``node`` and ``coordinator`` build on it.
"""

from crowdtrain.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_into,
    params_sha256,
    save_checkpoint,
    sha256_file,
)
from crowdtrain.model.evaluate import EvalResult, evaluate
from crowdtrain.model.gpt import (
    GPT,
    GPTConfig,
    estimate_flops_per_token,
    lm_loss,
    sequence_losses,
)
from crowdtrain.model.params import param_groups
from crowdtrain.model.tokenizer import EOD_BYTE, ByteTokenizer, Tokenizer

__all__ = [
    "EOD_BYTE",
    "GPT",
    "ByteTokenizer",
    "CheckpointError",
    "EvalResult",
    "GPTConfig",
    "Tokenizer",
    "estimate_flops_per_token",
    "evaluate",
    "lm_loss",
    "load_checkpoint",
    "load_into",
    "param_groups",
    "params_sha256",
    "save_checkpoint",
    "sequence_losses",
    "sha256_file",
]
