"""The loss: divergences, the dense, chunked and sparse forms, the hidden-state term and the objective."""
