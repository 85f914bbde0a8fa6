"""Report figures (matplotlib, Agg backend), each written atomically as a PNG."""
