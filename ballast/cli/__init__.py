"""The `ballast` command line: typer commands, one module per group."""
