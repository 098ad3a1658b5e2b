"""The teacher's side of a step: live signals, the offline cache and on-policy generation."""
