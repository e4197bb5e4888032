"""Plots and visual maps: training curves, PCA and attention maps."""
