"""Evaluation: guided generation, zero-shot FID and CLIP score, text adherence, sweeps and reports."""
