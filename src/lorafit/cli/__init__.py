"""The `lorafit` command line: `main` (dispatch, YAML defaults, one-line errors and exit codes) and one module
per command (its flags as a dataclass; parse, call the library, print). No library logic lives here."""
