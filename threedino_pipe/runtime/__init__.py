"""The runtime layer under every stage: errors, folders, atomic files, progress, OpenMP, device and
precision, torch.distributed, run folders, CSV logs and checkpoints.

Nothing here imports a stage or a building block (models, data, ...); see docs/architecture.md.
"""
