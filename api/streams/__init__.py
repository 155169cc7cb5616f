"""Real-time streams (issue 14, ADR-0021): SSE, WebSocket and GraphQL subscriptions from NATS JetStream."""

from api.streams.routes import ROUTES

__all__ = ["ROUTES"]
