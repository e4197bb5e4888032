"""inference stage package."""
