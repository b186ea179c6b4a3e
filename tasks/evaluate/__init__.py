"""Stages health and evaluate: health verdicts, quality evaluation, KL-divergence."""
