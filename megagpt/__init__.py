"""megagpt: pretrain, fine-tune and serve the Chinese GPT-3 family, from a laptop CPU to clusters."""

__version__ = "0.1.0"
