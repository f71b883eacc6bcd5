"""Training with the model card's recipe: AGC, image-folder data, the training loop with exact resume."""
