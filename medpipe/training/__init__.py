"""Training: one loop for every model medpipe trains, and what it needs (imbalance handling, curves)."""
