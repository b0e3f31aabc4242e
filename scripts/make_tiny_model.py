"""Build a tiny Llama-architecture base model and its tokenizer, offline.

    python scripts/make_tiny_model.py --out models/tiny                      # BPE trained here
    python scripts/make_tiny_model.py --out models/tiny-llama-tok \\
        --tokenizer ../shared/data/models/tinyllama-1.1b-chat-v1.0-tokenizer  # the real Llama tokenizer

The folder works as --model_name and --tokenizer_name of every stage (see ser/tiny.py).
"""

from ser.cli import parse
from ser.tiny import Args, build

if __name__ == "__main__":
    build(*parse([Args]))
