"""The command-line tools' parsers and main functions; each ``tools/*.py`` is a shim over one."""
