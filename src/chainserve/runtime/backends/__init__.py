"""Compute backends behind one interface (:mod:`.base`): ``torch`` (real weights) and ``emulated``."""
