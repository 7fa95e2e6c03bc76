"""Model families: each names its config parsing, tower, rope index, chat template and HF names."""
