"""Recovery after pruning: fine-tune the pruned model towards the original (knowledge distillation, task
loss, or both; optional feature matching and LoRA), on one process or a torchrun DDP job, resumable.

    import prunekit as pk
    small = pk.recover(pruned, teacher=original, data=pk.data.load("fashion-mnist", limit=2048),
                       epochs=2, lr=1e-3, checkpoint_dir="runs/recover-1")
"""
from .loop import RecoverResult, RecoveryDiverged, apply_lora, lr_at, recover
from .losses import kd_loss, logits_of, task_loss
from .options import Recover

__all__ = ["Recover", "RecoverResult", "RecoveryDiverged", "recover", "kd_loss", "task_loss", "logits_of",
           "apply_lora", "lr_at"]
