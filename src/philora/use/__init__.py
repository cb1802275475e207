"""Using a trained run: merge, generate and chat, the evaluation report."""
