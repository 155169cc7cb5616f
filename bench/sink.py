"""A plain QoS 1 shared-subscription consumer (gmqtt, optimistic PUBACK): the Mosquitto-alone ceiling.

Usage: sink.py PORT SECONDS -> prints {"count": N, "seconds": first-to-last message}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import gmqtt
import uvloop


async def main(port: int, seconds: float) -> None:
    count = 0
    first = last = 0.0

    def on_message(client: object, topic: str, payload: bytes, qos: int, properties: object) -> int:
        nonlocal count, first, last
        now = time.monotonic()
        if not count:
            first = now
        count += 1
        last = now
        return 0

    client = gmqtt.Client("bench-sink", receive_maximum=1000)
    client.on_message = on_message
    await client.connect("127.0.0.1", port)
    client.subscribe(gmqtt.Subscription("$share/sink/v1/+/d/+/telemetry", qos=1))
    await asyncio.sleep(seconds)
    await client.disconnect()
    print(json.dumps({"count": count, "seconds": last - first}))


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
