"""models stage package."""
