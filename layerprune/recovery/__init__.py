"""Recovery after pruning: LoRA finetuning with the sparsity mask kept fixed."""
from layerprune.recovery.finetune import finetune_run
from layerprune.recovery.lora import apply_masks, finetune_lora, masks_of

__all__ = ["apply_masks", "finetune_lora", "finetune_run", "masks_of"]
