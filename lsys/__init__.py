"""lsys: distributed long-sequence training for transformers."""
