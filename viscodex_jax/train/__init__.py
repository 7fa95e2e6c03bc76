"""Supervised fine-tuning: loss, sharded train state and step, checkpointing, the loop."""
