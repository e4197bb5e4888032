"""preprocessing stage package."""
