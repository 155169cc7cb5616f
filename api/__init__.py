"""REST API service (Litestar): ``create_app(settings)`` is the composition root."""
