"""data stage package."""
