"""Leaving philora: GGUF files (tensors, vocabulary, Ollama Modelfile), adapter check and convert."""
