"""Evaluation tasks, scored as the authors' scripts and lm-evaluation-harness do."""
