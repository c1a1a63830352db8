"""occbench."""
