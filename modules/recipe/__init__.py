"""The recipe: settings and presets, the models, the losses, augmentation, the training step, the loop and sampling.
Nothing here touches files, processes or the clock beyond what a training step needs."""
