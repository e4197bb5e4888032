"""Metrics (Dice, HD95, AUC, F1), statistics (bootstrap CIs, Wilcoxon, Welch), reports."""
