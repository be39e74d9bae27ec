#!/usr/bin/env python3
"""Mixed load against a running `tessera serve` for the soak test (scripts/soak.sh runs it).

CONCURRENCY clients loop until DURATION seconds have passed, each request drawn at random from: plain and
streamed completions and chat completions, `n` > 1, stop strings, logprobs (up to top 20), clients that
hang up at a random point, and slow readers (a kilobyte at a time, with pauses). Only the standard
library: raw HTTP/1.1 over asyncio streams, so a hang-up or a slow read is exactly what it says.

Every request ends in exactly one outcome:
  ok         a complete answer: a 200 JSON body with every choice finished, or a stream ending in [DONE]
             with every choice's finish_reason;
  cancelled  the client hung up on purpose before the end;
  busy       a 503 (no replica ready: the window while a killed worker's replica restarts);
  failed     anything else (another status, a broken or truncated answer, an error event in a stream);
and the printed JSON summary counts them. Exit status 1 if any request failed.

Usage: soak.py URL DURATION_S CONCURRENCY [SEED]
"""

import asyncio
import json
import random
import sys
import time

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a girl named Sue",
           "Tom had a red ball", "The sun was hot and"]


class Broken(Exception):
    pass


async def request(url, path, body, on_open=None, reader_mode="normal", rng=None, hang_up_after=None):
    """POSTs body; returns (status, bytes of the body) or raises Broken; 'cancel' when hung up on purpose."""
    host, port = url.split("//")[1].split(":")
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
    try:
        data = json.dumps(body).encode()
        w.write(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode() + data)
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 600)
        status = int(head.split(b" ")[1])
        chunked = b"transfer-encoding: chunked" in head.lower()
        out = bytearray()
        while True:
            if hang_up_after is not None and len(out) >= hang_up_after:
                return status, "cancel"
            if reader_mode == "slow":
                # A slow reader: small reads with pauses (about 40 kB/s), so the server's writes back up.
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                piece = await asyncio.wait_for(r.read(1024), 600)
            else:
                piece = await asyncio.wait_for(r.read(65536), 600)
            if not piece:
                break
            out += piece
        body = bytes(out)
        if chunked:
            body = dechunk(body)
        return status, body
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
        raise Broken(f"{type(e).__name__}: {e}")
    finally:
        w.close()


def dechunk(raw):
    out, i = bytearray(), 0
    while True:
        j = raw.index(b"\r\n", i)
        n = int(raw[i:j].split(b";")[0], 16)
        if n == 0:
            return bytes(out)
        out += raw[j + 2:j + 2 + n]
        i = j + 2 + n + 2


def draw(rng):
    chat = rng.random() < 0.4
    stream = rng.random() < 0.5
    n = rng.choice([1, 1, 1, 2, 3])
    body = {"model": "stories260K", "max_tokens": rng.choice([8, 32, 64, 128, 200]), "stream": stream}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = 0.8
        body["seed"] = rng.randrange(1 << 30)
    if n > 1:
        body["n"] = n
    if rng.random() < 0.2:
        body["stop"] = [rng.choice([".", " the", "\n", "!"])]
    if rng.random() < 0.25:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = rng.choice([1, 5, 20])
        else:
            body["logprobs"] = rng.choice([1, 5, 20])
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = rng.choice(PROMPTS)
        path = "/v1/completions"
    return path, body, n


def judge(status, payload, stream, n):
    if payload == "cancel":
        return "cancelled"
    if status == 503:
        return "busy"
    if status != 200:
        return f"failed: status {status}: {payload[:200]!r}"
    if not stream:
        v = json.loads(payload)
        reasons = [c.get("finish_reason") for c in v["choices"]]
        return "ok" if len(reasons) == n and all(reasons) else f"failed: unfinished choices {reasons}"
    events = [line[5:].strip() for line in payload.decode().split("\n") if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        return "failed: stream without [DONE]"
    finished = set()
    for e in events[:-1]:
        v = json.loads(e)
        if "error" in v:
            return f"failed: error event {v['error']}"
        for c in v.get("choices", []):
            if c.get("finish_reason"):
                finished.add(c["index"])
    return "ok" if len(finished) == n else f"failed: {len(finished)} of {n} choices finished"


async def client(url, deadline, rng, tally, failures):
    while time.monotonic() < deadline:
        path, body, n = draw(rng)
        mode = "slow" if rng.random() < 0.1 else "normal"
        hang_up = rng.randrange(0, 2000) if rng.random() < 0.1 else None
        try:
            status, payload = await request(url, path, body, reader_mode=mode, rng=rng, hang_up_after=hang_up)
            outcome = judge(status, payload, body["stream"], n)
        except Broken as e:
            outcome = f"failed: {e}"
        except (ValueError, KeyError) as e:
            outcome = f"failed: unreadable answer: {e}"
        key = outcome.split(":")[0]
        tally[key] = tally.get(key, 0) + 1
        if key == "failed" and len(failures) < 20:
            failures.append(outcome)


async def main():
    url, duration, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    deadline = time.monotonic() + duration
    tally, failures = {}, []
    await asyncio.gather(*(client(url, deadline, random.Random(seed * 1000 + i), tally, failures)
                           for i in range(concurrency)))
    print(json.dumps({"requests": sum(tally.values()), **tally, "failures": failures}))
    return 1 if tally.get("failed") else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
