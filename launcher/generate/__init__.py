"""`calm generate`: completions from a saved composition, in one process."""
