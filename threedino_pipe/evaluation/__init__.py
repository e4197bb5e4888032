"""evaluation stage package."""
