"""The command line: one module per command, the shared options, the exit codes. The only
package that imports Typer or rich, prints, or exits."""
