"""Export a run (or any model layerprune loads) to other runtimes: ``gguf`` writes a llama.cpp GGUF file."""
