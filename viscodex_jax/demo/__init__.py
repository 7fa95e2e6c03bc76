"""The paper in miniature: tiny checkpoints, generated data, merge, SFT, eval and a report."""
