"""The shared conformance suite every adapter subclasses."""
