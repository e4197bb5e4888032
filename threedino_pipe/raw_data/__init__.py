"""dataset stage package."""
