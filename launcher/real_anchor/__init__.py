"""CALM on a real pretrained anchor (issue #23): SmolLM2 composed with a specialist trained here."""
