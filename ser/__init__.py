"""Shared pieces of the SER stage scripts: data schema and loading, the text template,
model and tokenizer loading, batched scoring, and the command-line conventions."""
