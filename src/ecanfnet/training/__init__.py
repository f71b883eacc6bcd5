"""Training with the model card's recipe: settings (config), run state and exact resume (state), image-folder data,
AGC, and the loop (loop.train)."""
