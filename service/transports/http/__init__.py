"""KServe v2 over HTTP/REST and the task routes, on aiohttp."""
