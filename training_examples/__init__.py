"""Training examples: the demo (grpo_tiny), asynchronous GRPO, a custom loop, the weight swap alone."""
