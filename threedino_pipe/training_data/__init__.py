"""Data loading: splits and label-efficiency subsets, crops, augmentations, loaders."""
