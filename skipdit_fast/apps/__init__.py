"""The applications on top of the library: the `skipdit-fast` command line (cli.py)
and one module per subcommand (info, demo, sample, train, tune; bench lives in
skipdit_fast.benchmark). Each subcommand module provides add_arguments(parser) and
main(args) -> int. Layer: the top; nothing in the library imports it."""
