"""Loaders for checkpoints that are not transformers folders (llama2.c `.bin` files)."""

from offload.models.llama2c import Llama2cHeader, load_llama2c, load_llama2c_model, read_llama2c_header
from offload.models.tokenizer import (
    Llama2cBinTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_llama2c_tokenizer,
)

__all__ = [
    "Llama2cBinTokenizer",
    "Llama2cHeader",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_llama2c",
    "load_llama2c_model",
    "load_llama2c_tokenizer",
    "read_llama2c_header",
]
