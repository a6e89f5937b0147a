"""Why the gateway cannot serve a request, as domain errors; the API module maps them to HTTP.

Each carries what OpenAI's error body needs besides the status: a message a developer can act
on, the request field at fault (``param``) and a machine-readable ``code``.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors an inference route answers with."""

    code: str = "error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequest(ServingError):
    """The request cannot be served as sent (an unsupported option, a prompt too long, the
    wrong kind of model for the route)."""

    code = "invalid_request"


class Unauthorized(ServingError):
    """An API key is configured and the request does not carry it."""

    code = "invalid_api_key"


class NoModel(ServingError):
    """Nothing is installed yet: the gateway waits for its first assignment."""

    code = "model_not_ready"


class Saturated(ServingError):
    """Every generation slot stayed busy for the whole queue timeout."""

    code = "overloaded"


class GenerationFailed(ServingError):
    """The model failed while running (counted as an error in the health report)."""

    code = "generation_failed"
