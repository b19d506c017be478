"""Turning rows into what a model is asked: templates, labels, token budgets, the embedded model."""
