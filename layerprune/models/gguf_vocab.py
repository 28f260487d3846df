"""Names llama.cpp gives tokenizers (GGUF ``tokenizer.ggml.model`` / ``tokenizer.ggml.pre``); they echo model
names, so they live under models/ with the adapters (tests/test_imports.py)."""
from __future__ import annotations

import json

TOKENIZER_MODEL = "gpt2"  # GGUF's name for byte-level BPE, whatever the model

# tokenizer.json pre-tokenizer (canonical JSON) -> llama.cpp's tokenizer.ggml.pre. Plain byte-level BPE with the GPT-2
# regex (GPT-2, and SmolLM2 as transformers rebuilds it from its GGUF); SmolLM2's hub tokenizer splits digits first.
PRE_TOKENIZERS = {
    '{"add_prefix_space": false, "trim_offsets": true, "type": "ByteLevel", "use_regex": true}': "gpt-2",
    '{"pretokenizers": [{"individual_digits": true, "type": "Digits"}, {"add_prefix_space": false, '
    '"trim_offsets": true, "type": "ByteLevel", "use_regex": true}], "type": "Sequence"}': "smollm",
    # Qwen2 / Qwen2.5 / Qwen3: the Split regex of their tokenizer.json, which llama.cpp's qwen2 pre-tokenizer copies
    json.dumps({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {"Regex": (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")}},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        sort_keys=True): "qwen2",
}
