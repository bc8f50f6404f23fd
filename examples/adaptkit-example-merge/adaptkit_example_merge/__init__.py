"""Example adaptkit plugin: the element-wise median merge."""
