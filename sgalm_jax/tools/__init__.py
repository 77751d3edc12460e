"""Command-line tools that read run directories (plots, ...)."""
