"""Step 4, recovery: fine-tune the pruned model towards the original (knowledge distillation, task loss, or both;
optional feature matching and LoRA), on one process or a torchrun DDP/FSDP job, resumable.

    small = pk.recover(pruned, teacher=original, data=pk.data.load("fashion-mnist", limit=2048),
                       epochs=2, lr=1e-3, checkpoint_dir="runs/recover-1")
    lm = pk.recover(pruned_lm, teacher=lm, data=texts, tokenizer=tok, tokens=200_000, seq_len=512, loss="kd")
"""
from prunekit.recover.common import RecoverResult, apply_lora, lr_at
from prunekit.recover.loop import recover
from prunekit.recover.losses import kd_loss, topk_kd_loss
from prunekit.recover.options import Recover
from prunekit.recover.resume import resume
from prunekit.recover.stream import PackedTokens
from prunekit.recover.teacher import TeacherCache, precompute_teacher

__all__ = ["RecoverResult", "apply_lora", "lr_at", "recover", "kd_loss", "topk_kd_loss", "Recover", "resume", "PackedTokens",
           "TeacherCache", "precompute_teacher"]
