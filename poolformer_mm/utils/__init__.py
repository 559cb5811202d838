"""Small helpers every layer uses: the project's errors, known warnings, CPU flags, the parts of
a wrapped model, and a config's task."""
