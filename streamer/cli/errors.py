"""The errors of the `microseg` API clients, each reported as one line on stderr.

In: a failure found while building a request, sending it or reading its answer. Out: an
exception carrying the line to print and the exit status (1 for the API or the agent, 2 for
arguments, as argparse). No stack trace ever reaches the user.
"""

from __future__ import annotations

__all__ = ["ApiError", "ClientError", "UsageError"]


class ClientError(Exception):
    """A failure to report in one line on stderr; `exit_status` is what the command returns."""

    def __init__(self, message: str, exit_status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status

    def __str__(self) -> str:
        return self.message


class UsageError(ClientError):
    """Arguments that make no request possible (exit status 2, like argparse)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


class ApiError(ClientError):
    """The API answered with an error status: `status`, its `code` and its `api_message`."""

    def __init__(self, status: int, code: str | None, api_message: str) -> None:
        self.status = status
        self.code = code
        self.api_message = api_message
        where = f"HTTP {status} {code}" if code else f"HTTP {status}"
        super().__init__(f"{api_message} ({where})")
