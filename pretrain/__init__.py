"""pretrain: GPT pretraining from raw text, on DeepSpeed, on one machine or many."""

__version__ = "0.1.0"
