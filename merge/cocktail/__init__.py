"""LM-Cocktail's recipe: the examples, each candidate's loss on them, and the weights.

The weights are softmax(-loss / T); nothing here runs workers or Ray (merge.job.cocktail_weights does).
"""
