"""Training: the settings and recipes, optimisation, the learner, the epoch loop, state and resume, the run,
fine-tuning and the fused CPU BatchNorm kernel. Knows every other part of the package."""
