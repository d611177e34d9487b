"""The `microseg` command: its parser and the clients of the admin API."""
