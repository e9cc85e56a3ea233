"""The benchmark harness: ``unbackdoor bench`` (a grid of cells into one SQLite store) and
``unbackdoor report`` (Markdown/CSV tables, PNG plots, one HTML page)."""
