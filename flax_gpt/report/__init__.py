"""`flax-gpt report`: plots, word clouds and an index.html for a run directory."""
