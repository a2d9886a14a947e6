"""Offline synthetic speech corpus maker (issue 5): ASR, spoken QA, state discrimination and duplex scripts.

`python -m src.corpus --help`; the output format is specified in docs/corpus.md.
"""
