"""training stage package."""
