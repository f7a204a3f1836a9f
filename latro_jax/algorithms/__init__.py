"""One module per trainer: rollout -> scored batch -> update."""
