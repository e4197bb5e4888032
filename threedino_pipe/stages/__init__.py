"""The stages: one module per ``3dino`` command, each with one ``run(...)`` the CLI calls.

verify, plan, preprocess, pretrain, adapt_highres, finetune (segmentation heads; ``--head probe``
dispatches to the classification probe of :mod:`threedino_pipe.training.probe`), predict, embed,
evaluate, export and visualize. A stage never imports another stage; what two stages share lives
below them (docs/architecture.md, "Layers").
"""
