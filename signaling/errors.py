"""Errors the HTTP side answers with: JSON bodies that say what is wrong."""

from __future__ import annotations

from aiohttp import web


class SessionRefused(Exception):
    """A call could not be set up; `status` and `message` go back to the client as they are."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def json_error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
