"""The Python client of the task API (`convserve.v1.Vision`), synchronous and asyncio; the CLI uses it.

from service.client import VisionClient
"""

from service.client.vision import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_SECONDS,
    AsyncVisionClient,
    VisionClient,
    caption_request,
    channel_credentials,
    classify_request,
    generate_request,
    to_image,
)

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_SECONDS",
    "AsyncVisionClient",
    "VisionClient",
    "caption_request",
    "channel_credentials",
    "classify_request",
    "generate_request",
    "to_image",
]
