"""LM-Cocktail's headline experiment on the real SmolLM2-135M-Instruct, whole: the tasks, general
ability, the cached fine-tunes, scoring, the experiment and its report."""
