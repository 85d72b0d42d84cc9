"""The admin plane: operations shared by the CLI and the web console (DESIGN.md)."""
