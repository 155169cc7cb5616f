"""How a notification leaves: signed webhooks and chat webhooks over HTTP(S), mail over SMTP (STARTTLS, login).
Each send raises ``Failed(reason)`` with a short, countable reason; nothing here touches the database."""

from __future__ import annotations

import asyncio
import ipaddress
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from kestrel_core.rules.channels import SIGNATURE_HEADER, ChatChannel, EmailChannel, WebhookChannel, render, sign
from rules.settings import RulesSettings


class Failed(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


async def check_address(url: str, allow_private: bool) -> None:
    """Refuse a webhook that resolves to loopback, private, link-local or otherwise internal addresses (SSRF), unless
    the operator allows them (``KESTREL_RULES_WEBHOOK_ALLOW_PRIVATE``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failed("bad_url", "http(s) URL with a host expected")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Failed("dns_error", str(exc)[:200]) from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise Failed("forbidden_address", f"{parts.hostname} resolves to a non-public address")


class Transports:
    def __init__(self, settings: RulesSettings) -> None:
        self.settings = settings
        self.http = httpx.AsyncClient(timeout=settings.delivery_timeout_s, follow_redirects=False)

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        await check_address(url, self.settings.webhook_allow_private)
        try:
            response = await asyncio.wait_for(
                self.http.post(url, content=body, headers={"Content-Type": "application/json", **headers}),
                self.settings.delivery_timeout_s,
            )
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise Failed("timeout") from exc
        except httpx.HTTPError as exc:
            raise Failed("connect_error", type(exc).__name__) from exc
        if not 200 <= response.status_code < 300:
            raise Failed(f"http_{response.status_code}")

    async def webhook(self, channel: WebhookChannel, secret: str, delivery_id: str, document: dict[str, Any]) -> None:
        body = msgspec.json.encode(document)
        headers = {SIGNATURE_HEADER: sign(secret, int(time.time()), body), "Idempotency-Key": delivery_id,
                   "Kestrel-Delivery": delivery_id}  # fmt: skip
        await self._post(channel.url, body, headers)

    async def chat(self, channel: ChatChannel, delivery_id: str, values: dict[str, str]) -> None:
        body = msgspec.json.encode({"text": render(channel.text, values)})
        await self._post(channel.url, body, {"Idempotency-Key": delivery_id})

    async def email(self, channel: EmailChannel, delivery_id: str, values: dict[str, str]) -> None:
        settings = self.settings
        if not settings.smtp_host:
            raise Failed("smtp_not_configured")
        message = EmailMessage()
        message["From"] = settings.smtp_from
        message["To"] = ", ".join(channel.to)
        message["Subject"] = " ".join(render(channel.subject, values)[:300].splitlines())
        message["Message-ID"] = f"<{delivery_id}@kestrel>"  # the idempotency key, as mail knows it
        message.set_content(render(channel.text, values))

        def send() -> None:
            with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.delivery_timeout_s) as smtp:
                if settings.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context(cafile=settings.smtp_ca_file or None))
                if settings.smtp_username:
                    smtp.login(settings.smtp_username, settings.smtp_password.reveal())
                refused = smtp.send_message(message)
                if refused:
                    raise Failed("refused_recipients", ", ".join(sorted(refused))[:200])

        try:
            await asyncio.wait_for(asyncio.to_thread(send), settings.delivery_timeout_s * 2)
        except (TimeoutError, smtplib.SMTPServerDisconnected, OSError) as exc:
            raise Failed("smtp_unavailable", type(exc).__name__) from exc
        except smtplib.SMTPException as exc:
            raise Failed("smtp_error", str(exc)[:200]) from exc
