"""Guides q_phi, in the file of the same name as their model (``guides/<name>.py``)."""
