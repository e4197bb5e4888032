"""planning stage package."""
