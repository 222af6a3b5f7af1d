"""Checkpoints on disk: `hf` loads and saves Hugging Face checkpoint directories (one table
of forward and inverse transforms per family), `safetensors` reads weights strictly,
`preprocess` reads their tokenizer and image-processor files."""
