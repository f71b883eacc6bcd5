"""Training with the model card's recipe (work in progress: adaptive gradient clipping so far)."""
