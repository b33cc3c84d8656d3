"""One module per `grokserve` subcommand; see `grokserve.cli`."""
