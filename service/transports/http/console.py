"""The web console's static files, shipped in the package (service/transports/http/console/).

The files are read once at start and served from memory by name: no path from a request ever
reaches the file system, and nothing is fetched from elsewhere at run time (a cluster without
egress serves the same page). They hold no data, so they are served without a token, and they are
not API calls: no access log line, no request metrics. The page calls only the public HTTP API,
with the visitor's token.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

#: Where the files are, in the package.
CONSOLE_FOLDER = Path(__file__).with_name("console")
#: The files served, by suffix; anything else in the folder is not.
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_TEXT = {".html", ".js", ".css", ".svg"}


class ConsoleFiles:
    """GET / (the page) and GET /console/{file} (its scripts, style sheet and example images)."""

    def __init__(self, folder: Path = CONSOLE_FOLDER) -> None:
        self.files: dict[str, tuple[bytes, str]] = {
            path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
            for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix in CONTENT_TYPES
        }
        if "index.html" not in self.files:
            raise FileNotFoundError(f"the console's index.html is missing in {folder}")

    async def index(self, request: web.Request) -> web.Response:
        return self._answer("index.html")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        # the page only at /: its relative links are written for that place
        return self._answer("" if name == "index.html" else name)

    def _answer(self, name: str) -> web.Response:
        found = self.files.get(name)
        if found is None:
            return web.Response(
                body=b'{"error": "no such file in the console"}', status=404, content_type="application/json"
            )
        body, content_type = found
        charset = "utf-8" if Path(name).suffix in _TEXT else None
        return web.Response(
            body=body,
            content_type=content_type,
            charset=charset,
            headers={"Cache-Control": "no-cache"},  # revalidate: a new server version shows at once
        )
