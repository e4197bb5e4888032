"""``3dino study``: the label-efficiency experiment as one command, composed of finetune, predict and evaluate."""
