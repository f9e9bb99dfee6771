"""The paper's experiments as code (paper §4): each writes a markdown report and PNG plots."""
