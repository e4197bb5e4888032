"""ssl stage package."""
