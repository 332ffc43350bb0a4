"""Evaluating a model: exact NLL in data space (``nll``) and the toy data's divergences
(``toy_metrics``)."""
