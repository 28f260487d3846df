"""The dtypes by name, the one list (a leaf: ``models/`` and ``config`` read it)."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
