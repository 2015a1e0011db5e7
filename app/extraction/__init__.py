"""Extracting activations from transformers over text corpora, into a memory-mapped store."""
