"""Training with the model card's recipe: settings (config), run state and exact resume (state), image-folder data,
AGC, what the model card reports (card), and the loop (loop.train)."""
