"""HTTP: the operators' side port and the demo files."""
