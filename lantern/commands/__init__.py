"""One module per `lantern` subcommand; see `lantern.cli`."""
