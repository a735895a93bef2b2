"""Prima: a brain-MRI vision-language model (load studies, tokenize, encode, predict, explain)."""

__version__ = "0.1.0"
