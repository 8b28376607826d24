"""Corpora, tokenizers and token streams."""

from moekit.data.corpus import Document, by_split, load_corpus, load_text, load_wiki, split_of, wiki_data_dir
from moekit.data.dataset import TaskStreams, TokenStream
from moekit.data.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer

__all__ = [
    "Document",
    "load_corpus",
    "load_wiki",
    "load_text",
    "by_split",
    "split_of",
    "wiki_data_dir",
    "TaskStreams",
    "TokenStream",
    "train_tokenizer",
    "load_tokenizer",
    "eos_id",
    "EOS",
]
