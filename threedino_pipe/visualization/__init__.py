"""visualization stage package."""
