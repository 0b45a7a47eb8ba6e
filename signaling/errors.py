"""Errors the HTTP side answers with: JSON bodies that say what is wrong."""

from __future__ import annotations

from aiohttp import web


class SessionRefused(Exception):
    """A call could not be set up; `status` and `message` go back to the client as they are."""

    def __init__(self, status: int, message: str, headers: dict | None = None, session_id: str | None = None):
        """`session_id`: the call was made and ended at once (no relay): GET /sessions/{id} says why."""
        super().__init__(message)
        self.status, self.message, self.headers, self.session_id = status, message, headers, session_id

    def response(self) -> web.Response:
        extra = {"session_id": self.session_id} if self.session_id is not None else None
        return json_error(self.status, self.message, self.headers, extra)


def json_error(status: int, message: str, headers: dict | None = None, extra: dict | None = None) -> web.Response:
    return web.json_response({"error": message, **(extra or {})}, status=status, headers=headers)
