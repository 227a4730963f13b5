"""Command-line interface: `lorakit <verb>`."""
